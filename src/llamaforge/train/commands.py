"""`llamaforge pretrain | finetune | pretokenize | train-tokenizer | merge`.

pretrain and finetune take one options dataclass each (`configs.PretrainConfig`,
`configs.FinetuneConfig`): the CLI expands it into flags and reads `--config FILE.yaml` onto it; a
flag given on the command line wins over the file, the file over the defaults.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from ..cards import write_model_card
from ..config import preset as get_preset, torch_dtype
from ..formats import gguf as gguf_format
from ..formats import hf, load_checkpoint
from ..generate import generate
from ..lora import LoraConfig, apply_lora, load_adapter, save_adapter_tensors
from ..model import Transformer
from ..paths import default_model_path
from ..quant import quantize_model
from ..sampling import SamplingParams
from .configs import FinetuneConfig, PretrainConfig
from .data import (PretrainSource, RowSource, TokenShards, build_sft_rows, load_tokenizer, pretokenize_files,
                   read_sft_jsonl, split_validation, train_sentencepiece)
from .distributed import setup
from .trainer import Trainer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- tokenizer and data

def train_tokenizer(corpus: str, *, vocab_size: int = 4096, output: str) -> int:
    """Train a sentencepiece tokenizer the Llama 2 way (BPE, byte fallback, split digits).

    corpus: text file (several comma-separated files allowed)
    output: folder that receives tokenizer.model
    """
    out = train_sentencepiece([c for c in corpus.split(",") if c], output, vocab_size=vocab_size)
    print(out / "tokenizer.model")
    return 0


def pretokenize(inputs: list[str], *, tokenizer: str, output: str, val_fraction: float = 0.05,
                shard_tokens: int = 50_000_000) -> int:
    """Tokenize text files once into memory-mapped token shards with a held-out validation shard.

    inputs: text files (each is one document)
    tokenizer: tokenizer.model / tokenizer.json / checkpoint folder
    output: folder for train_*.bin, val_*.bin and meta.json
    val_fraction: share of the tokens held out for validation
    """
    meta = pretokenize_files(inputs, tokenizer, output, val_fraction=val_fraction, shard_tokens=shard_tokens)
    print(f"{output}: {meta['train_tokens']} train tokens, {meta['val_tokens']} validation tokens")
    return 0


# ---------------------------------------------------------------- pretraining

def pretrain(options: PretrainConfig) -> int:
    """Pretrain a Llama from scratch on text (training its tokenizer and pretokenizing first if needed)."""
    summary = run_pretrain(options)
    if summary.get("sample") is not None:
        print(summary["sample"])
    _report(summary)
    return 0


def _report(summary: dict) -> None:
    val = summary["val_loss"]
    print(f"step {summary['step']}: train loss {summary['loss']:.4f}, validation loss "
          f"{val if val is None else round(val, 4)} -> {summary['output']}", file=sys.stderr)


def run_pretrain(opts: PretrainConfig) -> dict:
    """The pretrain command as a library call; returns the trainer's summary."""
    started = time.time()
    cfg = replace(opts.train, output=str(opts.output))
    ctx = setup(cfg.strategy)
    out = Path(opts.output)
    data = Path(opts.data) if opts.data else out / "data"
    tok_path = Path(opts.tokenizer) if opts.tokenizer else out / "tokenizer"
    if ctx.is_main:  # data preparation once, on the main process
        if not _has_tokenizer(tok_path):
            if not opts.text:
                raise ValueError(f"{tok_path}: no tokenizer there and no `text` to train one on")
            log.info("training a %d-token tokenizer on %s", opts.vocab_size, opts.text)
            train_sentencepiece(opts.text, tok_path, vocab_size=int(opts.vocab_size))
        if not (data / "meta.json").is_file():
            if not opts.text:
                raise ValueError(f"{data}: not pretokenized and no `text` given to tokenize")
            pretokenize_files(opts.text, tok_path, data, val_fraction=float(opts.val_fraction),
                              progress=cfg.progress)
    ctx.barrier()
    tok = load_tokenizer(tok_path)
    seq_len = int(opts.seq_len)
    shape = {k: getattr(opts, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if getattr(opts, k) is not None}
    args = get_preset(opts.preset).replace(vocab_size=tok.vocab_size, max_seq_len=seq_len, **shape)
    model = Transformer(args).init_weights(cfg.seed)
    train = PretrainSource(TokenShards(data, "train"), seq_len, seed=cfg.seed, random=True)
    val = PretrainSource(TokenShards(data, "val"), seq_len, random=False)
    log.info("model %s: %.2fM parameters; %d train tokens", args, args.n_params / 1e6, len(train.shards))

    def export(state: dict[str, torch.Tensor], directory: Path) -> None:
        hf.write(directory, args, state, tokenizer=tok, metadata={"license": opts.license} if opts.license else None)

    card = dict(produced_by="llamaforge pretrain", args=args, method="pretraining from scratch",
                data_files=[str(p) for p in (opts.text or [data])], license=opts.license,
                training_config={"seq_len": seq_len, "preset": opts.preset, "tokenizer": str(tok_path)})
    trainer = Trainer(model, cfg, train, val, export=export, card=card, ctx=ctx, started=started)
    summary = trainer.fit()
    summary["sample"] = None
    if ctx.is_main and opts.sample_tokens:
        summary["sample"] = sample_text(model, tok, int(opts.sample_tokens), seed=cfg.seed)
    ctx.close()
    return summary


def _has_tokenizer(path: Path) -> bool:
    return path.is_file() or (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()


def sample_text(model, tokenizer, n_tokens: int, *, prompt: str = "", seed: int = 0, temperature: float = 0.8) -> str:
    """A sampled continuation (from BOS alone by default) to eyeball what a model learned."""
    model.eval()
    ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None) if prompt else [tokenizer.bos_id or 0]
    params = SamplingParams(max_tokens=n_tokens, temperature=temperature, top_k=50, seed=seed, ignore_eos=True)
    with torch.no_grad():
        pieces = [ev.text for ev in generate(model, ids, params, tokenizer)]
    return prompt + "".join(pieces)


# ---------------------------------------------------------------- fine-tuning

def finetune(options: FinetuneConfig) -> int:
    """Fine-tune a checkpoint on JSONL data: full, LoRA or QLoRA (LoRA over an int8/int4 frozen base)."""
    _report(run_finetune(options))
    return 0


def load_base(path: str | None, *, dtype: str = "float32"):
    """A float Transformer plus the Checkpoint it came from (weights moved into the model)."""
    p = Path(path) if path else default_model_path()
    ckpt = load_checkpoint(p)
    if ckpt.args is None:
        raise ValueError(f"{p}: holds a vocabulary only, no model weights")
    if ckpt.tokenizer is None:
        raise ValueError(f"{p}: no tokenizer found next to the weights")
    dt = torch_dtype(dtype)
    model = Transformer.empty(ckpt.args).load_tensors({k: v.to(dt) for k, v in ckpt.tensors.items()})
    ckpt.tensors = {}
    return model, ckpt


def run_finetune(opts: FinetuneConfig, *, card_update: dict | None = None) -> dict:
    """The finetune command as a library call; returns the trainer's summary.

    card_update: model-card keys set by a caller that made the data (rejection sampling);
    its training_config is added to the fine-tuning settings.
    """
    if not opts.data:
        raise ValueError("no training data: pass --data FILE.jsonl (or `data:` in the config)")
    if not opts.output:
        raise ValueError("no output folder: pass --output DIR (or `output:` in the config)")
    started = time.time()
    method = opts.method
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method {method!r} is not one of full, lora, qlora")
    cfg = replace(opts.train, output=str(opts.output))
    ctx = setup(cfg.strategy)
    dialogues = read_sft_jsonl(opts.data, limit=opts.limit)
    if opts.val_data:
        train_d, val_d = dialogues, read_sft_jsonl(opts.val_data, limit=opts.val_max)
    else:
        train_d, val_d = split_validation(dialogues, float(opts.val_fraction), opts.val_max, cfg.seed)

    model, ckpt = load_base(opts.model)
    tok, template = ckpt.tokenizer, ckpt.chat_template or getattr(ckpt.tokenizer, "chat_template", None)
    seq_len = int(opts.seq_len)
    if seq_len + 1 > model.args.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context window {model.args.max_seq_len}")
    rows = build_sft_rows(train_d, tok, template, seq_len, pack=bool(opts.pack), progress=cfg.progress and ctx.is_main,
                          source=str(opts.data))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    train = RowSource(rows.rows, seed=cfg.seed, pad_id=pad)
    val = None
    if val_d:
        vrows = build_sft_rows(val_d, tok, template, seq_len, pack=False, progress=False,
                               source=str(opts.val_data or opts.data))
        val = RowSource(vrows.rows, shuffle=False, pad_id=pad)

    lora_cfg = None
    if method in ("lora", "qlora"):
        lora_cfg = LoraConfig(r=int(opts.lora_r), alpha=float(opts.lora_alpha),
                              dropout=float(opts.lora_dropout), targets=tuple(opts.lora_targets))
        if method == "qlora":
            quantize_model(model, opts.quant)
        torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global RNG: same seed, same run
        apply_lora(model, lora_cfg)
    base_name = str(ckpt.path) if ckpt.path else str(opts.model)

    def export(state: dict[str, torch.Tensor], directory: Path) -> None:
        if lora_cfg is not None:
            save_adapter_tensors(state, model.args, lora_cfg, directory, base_model=base_name)
        else:
            hf.write(directory, model.args, state, tokenizer=tok, chat_template=template,
                     metadata={"license": ckpt.license} if ckpt.license else None)

    card = dict(produced_by="llamaforge finetune", base_model=base_name, args=model.args,
                method={"full": "full fine-tuning", "lora": "LoRA", "qlora": f"QLoRA ({opts.quant} base)"}[method],
                data_files=[str(opts.data)] + ([str(opts.val_data)] if opts.val_data else []),
                license=ckpt.license,
                training_config={"seq_len": seq_len, "pack": bool(opts.pack), "train_records": len(train_d),
                                 "val_records": len(val_d), "rows": len(rows.rows), "truncated": rows.truncated,
                                 **({"lora_r": lora_cfg.r, "lora_alpha": lora_cfg.alpha,
                                     "lora_dropout": lora_cfg.dropout, "lora_targets": list(lora_cfg.targets)}
                                    if lora_cfg else {})})
    for key, value in (card_update or {}).items():
        card[key] = {**card[key], **value} if key == "training_config" else value
    trainer = Trainer(model, cfg, train, val, export=export, card=card, ctx=ctx, started=started)
    summary = trainer.fit()
    ctx.close()
    return summary


# ---------------------------------------------------------------- merging

def merge(base: str, adapter: str, *, output: str, gguf: str | None = None, qtype: str = "f16",
          dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> int:
    """Fold a LoRA adapter into its base model and write the merged checkpoint (HF folder, optionally GGUF).

    base: base checkpoint the adapter was trained on
    adapter: PEFT-format LoRA folder
    output: HF safetensors folder to write
    gguf: also write this .gguf file
    qtype: GGUF tensor type: f32, f16, bf16, q8_0, q4_0 or q4_1
    dtype: safetensors dtype of the HF folder
    """
    model, ckpt = load_base(base)
    load_adapter(model, adapter, merge=True)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    hf.write(output, model.args, tensors, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template,
             metadata={"license": ckpt.license} if ckpt.license else None,
             dtype=torch_dtype(dtype))
    if gguf:
        gguf_format.write(gguf, model.args, tensors, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template,
                          qtype=qtype, metadata={"license": ckpt.license} if ckpt.license else None)
    write_model_card(output, produced_by="llamaforge merge", base_model=str(ckpt.path or base), args=model.args,
                     method="LoRA merged into the base weights", license=ckpt.license,
                     extra={"adapter": str(Path(adapter).resolve())})
    print(output + (f" and {gguf}" if gguf else ""))
    return 0
