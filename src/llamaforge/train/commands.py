"""`llamaforge pretrain | finetune | pretokenize | train-tokenizer | merge`.

Every pretrain/finetune option can come from a YAML file (``--config``; keys are the option names)
or from flags; a flag given on the command line wins over the file, the file over the defaults.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

_TRAINER_KEYS = ("max_steps", "micro_batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                 "grad_clip", "precision", "gradient_checkpointing", "eval_every", "eval_batches", "save_every",
                 "keep_checkpoints", "seed", "resume", "progress", "strategy", "max_minutes")

PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    text=None, tokenizer=None, vocab_size=4096, data=None, val_fraction=0.05, preset="shakespeare-15m", dim=None,
    n_layers=None, n_heads=None, n_kv_heads=None, seq_len=256, output="runs/pretrain", max_steps=2000,
    micro_batch_size=16, grad_accum=1, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, grad_clip=1.0,
    precision="auto", gradient_checkpointing=False, eval_every=200, eval_batches=8, save_every=500,
    keep_checkpoints=2, seed=1337, resume=True, progress=True, strategy="ddp", max_minutes=0.0, sample_tokens=200,
    license=None)

FINETUNE_DEFAULTS: dict[str, Any] = dict(
    model=None, data=None, method="lora", output=None, val_data=None, val_fraction=0.02, val_max=200, limit=None,
    seq_len=512, pack=False, lora_r=16, lora_alpha=32.0, lora_dropout=0.0,
    lora_targets=["q", "k", "v", "o", "gate", "up", "down"], quant="int8", max_steps=200, micro_batch_size=4,
    grad_accum=2, lr=2e-4, min_lr_ratio=0.1, warmup_steps=10, weight_decay=0.1, grad_clip=1.0, precision="auto",
    gradient_checkpointing=False, eval_every=50, eval_batches=4, save_every=100, keep_checkpoints=2, seed=1337,
    resume=True, progress=True, strategy="ddp", max_minutes=0.0)


def resolve_options(defaults: dict[str, Any], config: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """defaults < YAML file < flags that were given (None means not given)."""
    opts = dict(defaults)
    if config is not None:
        import yaml
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
        base = path.parent
        for key in ("text", "tokenizer", "data", "output", "val_data", "model"):
            # paths in a config file are relative to the file, so configs work from any directory
            if isinstance(loaded.get(key), str) and not Path(loaded[key]).is_absolute():
                loaded[key] = str((base / loaded[key]).resolve())
            elif isinstance(loaded.get(key), list):
                loaded[key] = [str((base / v).resolve()) if not Path(v).is_absolute() else v for v in loaded[key]]
        opts.update(loaded)
    opts.update({k: v for k, v in flags.items() if v is not None})
    return opts


def _document_defaults(fn, defaults: dict[str, Any]):
    """Append each option's default to its `name: help` docstring line (defaults live in one dict,
    the signature says None = not given, so argparse cannot show them itself)."""
    import inspect
    doc = inspect.getdoc(fn) or ""
    lines, seen = [], set()
    for line in doc.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name in defaults and text.strip():
            seen.add(name)
            d = defaults[name]
            line = f"{line} (default: {' '.join(map(str, d)) if isinstance(d, list) else d})" if d is not None else line
        lines.append(line)
    extra = [f"{k}: default {' '.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in defaults.items() if k not in seen and v is not None]
    fn.__doc__ = "\n".join(lines + extra)
    return fn


def _trainer_config(opts: dict[str, Any]):
    from .trainer import TrainConfig
    return TrainConfig.from_dict({"output": str(opts["output"]), **{k: opts[k] for k in _TRAINER_KEYS}})


# ---------------------------------------------------------------- tokenizer and data

def train_tokenizer(corpus: str, *, vocab_size: int = 4096, output: str) -> int:
    """Train a sentencepiece tokenizer the Llama 2 way (BPE, byte fallback, split digits).

    corpus: text file (several comma-separated files allowed)
    output: folder that receives tokenizer.model
    """
    from .data import train_sentencepiece
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
    from .data import pretokenize_files
    meta = pretokenize_files(inputs, tokenizer, output, val_fraction=val_fraction, shard_tokens=shard_tokens)
    print(f"{output}: {meta['train_tokens']} train tokens, {meta['val_tokens']} validation tokens")
    return 0


# ---------------------------------------------------------------- pretraining

def pretrain(*, config: str | None = None, text: list[str] | None = None, tokenizer: str | None = None,
             vocab_size: int | None = None, data: str | None = None, val_fraction: float | None = None,
             preset: str | None = None, dim: int | None = None, n_layers: int | None = None,
             n_heads: int | None = None, n_kv_heads: int | None = None, seq_len: int | None = None,
             output: str | None = None, max_steps: int | None = None, micro_batch_size: int | None = None,
             grad_accum: int | None = None, lr: float | None = None, min_lr_ratio: float | None = None,
             warmup_steps: int | None = None, weight_decay: float | None = None, grad_clip: float | None = None,
             precision: str | None = None, gradient_checkpointing: bool | None = None, eval_every: int | None = None,
             eval_batches: int | None = None, save_every: int | None = None, keep_checkpoints: int | None = None,
             seed: int | None = None, resume: bool | None = None, progress: bool | None = None,
             strategy: str | None = None, max_minutes: float | None = None, sample_tokens: int | None = None,
             license: str | None = None) -> int:
    """Pretrain a Llama from scratch on text (training its tokenizer and pretokenizing first if needed).

    config: YAML file whose keys are these option names (flags override it)
    text: raw text files; tokenized into `data` when that folder has no meta.json yet
    tokenizer: tokenizer folder/file; trained on `text` with vocab_size when missing
    data: pretokenized folder (from `llamaforge pretokenize`)
    preset: ModelArgs preset to start from (dim, n_layers, n_heads, n_kv_heads override it)
    seq_len: training context length
    output: run folder: checkpoints/, train_log.jsonl, loss_curve.png, the final HF model
    micro_batch_size: sequences per process per micro-step (global batch = micro * grad_accum * processes)
    precision: auto (bf16 autocast where the CPU/GPU does bf16), fp32 or bf16
    save_every: checkpoint every N steps (0: only at the end)
    strategy: ddp or fsdp when launched with torchrun
    max_minutes: stop and save after this much wall time (0: no limit)
    sample_tokens: tokens of sample text printed at the end (0: none)
    """
    flags = {k: v for k, v in locals().items() if k != "config"}
    opts = resolve_options(PRETRAIN_DEFAULTS, config, flags)
    summary = run_pretrain(opts)
    if summary.get("sample") is not None:
        print(summary["sample"])
    print(f"step {summary['step']}: train loss {summary['loss']:.4f}, validation loss "
          f"{summary['val_loss'] if summary['val_loss'] is None else round(summary['val_loss'], 4)} -> {summary['output']}",
          file=sys.stderr)
    return 0


_document_defaults(pretrain, PRETRAIN_DEFAULTS)


def run_pretrain(opts: dict[str, Any]) -> dict[str, Any]:
    """The pretrain command as a library call on resolved options; returns the trainer's summary."""
    import torch

    from ..config import preset as get_preset
    from ..model import Transformer
    from .data import PretrainSource, TokenShards, load_tokenizer, pretokenize_files, train_sentencepiece
    from .distributed import setup
    from .trainer import Trainer

    started = time.time()
    cfg = _trainer_config(opts)
    ctx = setup(cfg.strategy)
    out = Path(opts["output"])
    data = Path(opts["data"]) if opts["data"] else out / "data"
    tok_path = Path(opts["tokenizer"]) if opts["tokenizer"] else out / "tokenizer"
    if ctx.is_main:  # data preparation once, on the main process
        if not _has_tokenizer(tok_path):
            if not opts["text"]:
                raise ValueError(f"{tok_path}: no tokenizer there and no `text` to train one on")
            log.info("training a %d-token tokenizer on %s", opts["vocab_size"], opts["text"])
            train_sentencepiece(opts["text"], tok_path, vocab_size=int(opts["vocab_size"]))
        if not (data / "meta.json").is_file():
            if not opts["text"]:
                raise ValueError(f"{data}: not pretokenized and no `text` given to tokenize")
            pretokenize_files(opts["text"], tok_path, data, val_fraction=float(opts["val_fraction"]),
                              progress=cfg.progress)
    ctx.barrier()
    tok = load_tokenizer(tok_path)
    seq_len = int(opts["seq_len"])
    shape = {k: opts[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if opts[k] is not None}
    args = get_preset(opts["preset"]).replace(vocab_size=tok.vocab_size, max_seq_len=seq_len, **shape)
    model = Transformer(args).init_weights(cfg.seed)
    train = PretrainSource(TokenShards(data, "train"), seq_len, seed=cfg.seed, random=True)
    val = PretrainSource(TokenShards(data, "val"), seq_len, random=False)
    log.info("model %s: %.2fM parameters; %d train tokens", args, args.n_params / 1e6, len(train.shards))

    def export(state: dict[str, torch.Tensor], directory: Path) -> None:
        from ..formats import hf
        hf.write(directory, args, state, tokenizer=tok, metadata={"license": opts["license"]} if opts["license"] else None)

    card = dict(produced_by="llamaforge pretrain", args=args, method="pretraining from scratch",
                data_files=[str(p) for p in (opts["text"] or [data])], license=opts["license"],
                training_config={"seq_len": seq_len, "preset": opts["preset"], "tokenizer": str(tok_path)})
    trainer = Trainer(model, cfg, train, val, export=export, card=card, ctx=ctx, started=started)
    summary = trainer.fit()
    summary["sample"] = None
    if ctx.is_main and opts.get("sample_tokens"):
        summary["sample"] = sample_text(model, tok, int(opts["sample_tokens"]), seed=cfg.seed)
    ctx.close()
    return summary


def _has_tokenizer(path: Path) -> bool:
    return path.is_file() or (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()


def sample_text(model, tokenizer, n_tokens: int, *, prompt: str = "", seed: int = 0, temperature: float = 0.8) -> str:
    """A sampled continuation (from BOS alone by default) to eyeball what a model learned."""
    import torch

    from ..generate import generate
    from ..sampling import SamplingParams
    model.eval()
    ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None) if prompt else [tokenizer.bos_id or 0]
    params = SamplingParams(max_tokens=n_tokens, temperature=temperature, top_k=50, seed=seed, ignore_eos=True)
    with torch.no_grad():
        pieces = [ev.text for ev in generate(model, ids, params, tokenizer)]
    return prompt + "".join(pieces)


# ---------------------------------------------------------------- fine-tuning

def finetune(*, model: str | None = None, data: str | None = None, method: Literal["full", "lora", "qlora"] | None = None,
             output: str | None = None, max_steps: int | None = None, config: str | None = None,
             val_data: str | None = None, val_fraction: float | None = None, val_max: int | None = None,
             limit: int | None = None, seq_len: int | None = None, pack: bool | None = None,
             lora_r: int | None = None, lora_alpha: float | None = None, lora_dropout: float | None = None,
             lora_targets: list[str] | None = None, quant: Literal["int8", "int4"] | None = None,
             micro_batch_size: int | None = None, grad_accum: int | None = None, lr: float | None = None,
             min_lr_ratio: float | None = None, warmup_steps: int | None = None, weight_decay: float | None = None,
             grad_clip: float | None = None, precision: str | None = None, gradient_checkpointing: bool | None = None,
             eval_every: int | None = None, eval_batches: int | None = None, save_every: int | None = None,
             keep_checkpoints: int | None = None, seed: int | None = None, resume: bool | None = None,
             progress: bool | None = None, strategy: str | None = None, max_minutes: float | None = None) -> int:
    """Fine-tune a checkpoint on JSONL data: full, LoRA or QLoRA (LoRA over an int8/int4 frozen base).

    model: base checkpoint (Meta/HF folder or .gguf; GGUF weights are dequantized to float32); bundled SmolLM2 when omitted
    data: JSONL records: {"messages"}, {"instruction","input","output"}, {"prompt","completion"} or {"question","answer"}
    method: full, lora or qlora
    output: run folder; holds the final adapter (lora/qlora) or HF model (full) and checkpoints/
    config: YAML file whose keys are these option names (flags override it)
    val_data: separate validation JSONL; else val_fraction of data (at most val_max records) is held out
    limit: use only the first N records of data
    seq_len: longest training sequence (longer examples are truncated)
    pack: pack several examples into each sequence
    lora_targets: modules to adapt: q k v o gate up down
    quant: base quantization for qlora
    """
    flags = {k: v for k, v in locals().items() if k != "config"}
    opts = resolve_options(FINETUNE_DEFAULTS, config, flags)
    summary = run_finetune(opts)
    print(f"step {summary['step']}: train loss {summary['loss']:.4f}, validation loss "
          f"{summary['val_loss'] if summary['val_loss'] is None else round(summary['val_loss'], 4)} -> {summary['output']}",
          file=sys.stderr)
    return 0


_document_defaults(finetune, FINETUNE_DEFAULTS)


def load_base(path: str | None, *, dtype: str = "float32"):
    """A float Transformer plus the Checkpoint it came from (weights moved into the model)."""
    import torch

    from ..formats import load_checkpoint
    from ..model import Transformer
    from ..paths import default_model_path
    p = Path(path) if path else default_model_path()
    ckpt = load_checkpoint(p)
    if ckpt.args is None:
        raise ValueError(f"{p}: holds a vocabulary only, no model weights")
    if ckpt.tokenizer is None:
        raise ValueError(f"{p}: no tokenizer found next to the weights")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Transformer.empty(ckpt.args).load_tensors({k: v.to(dt) for k, v in ckpt.tensors.items()})
    ckpt.tensors = {}
    return model, ckpt


def run_finetune(opts: dict[str, Any]) -> dict[str, Any]:
    """The finetune command as a library call on resolved options; returns the trainer's summary."""
    import torch

    from ..lora import LoraConfig, apply_lora, save_adapter_tensors
    from .data import RowSource, build_sft_rows, read_sft_jsonl, split_validation
    from .distributed import setup
    from .trainer import Trainer

    if not opts.get("data"):
        raise ValueError("no training data: pass --data FILE.jsonl (or `data:` in the config)")
    if not opts.get("output"):
        raise ValueError("no output folder: pass --output DIR (or `output:` in the config)")
    started = time.time()
    method = opts["method"]
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method {method!r} is not one of full, lora, qlora")
    cfg = _trainer_config(opts)
    ctx = setup(cfg.strategy)
    dialogues = read_sft_jsonl(opts["data"], limit=opts["limit"])
    if opts["val_data"]:
        train_d, val_d = dialogues, read_sft_jsonl(opts["val_data"], limit=opts["val_max"])
    else:
        train_d, val_d = split_validation(dialogues, float(opts["val_fraction"]), opts["val_max"], cfg.seed)

    model, ckpt = load_base(opts["model"])
    tok, template = ckpt.tokenizer, ckpt.chat_template or getattr(ckpt.tokenizer, "chat_template", None)
    seq_len = int(opts["seq_len"])
    if seq_len + 1 > model.args.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context window {model.args.max_seq_len}")
    rows = build_sft_rows(train_d, tok, template, seq_len, pack=bool(opts["pack"]), progress=cfg.progress and ctx.is_main,
                          source=str(opts["data"]))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    train = RowSource(rows.rows, seed=cfg.seed, pad_id=pad)
    val = None
    if val_d:
        vrows = build_sft_rows(val_d, tok, template, seq_len, pack=False, progress=False,
                               source=str(opts["val_data"] or opts["data"]))
        val = RowSource(vrows.rows, shuffle=False, pad_id=pad)

    lora_cfg = None
    if method in ("lora", "qlora"):
        lora_cfg = LoraConfig(r=int(opts["lora_r"]), alpha=float(opts["lora_alpha"]),
                              dropout=float(opts["lora_dropout"]), targets=tuple(opts["lora_targets"]))
        if method == "qlora":
            try:
                from ..quant import quantize_model
            except ImportError as e:
                raise ValueError(f"qlora needs llamaforge.quant.quantize_model, which is unavailable: {e}") from None
            quantize_model(model, opts["quant"])
        torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global RNG: same seed, same run
        apply_lora(model, lora_cfg)
    base_name = str(ckpt.path) if ckpt.path else str(opts["model"])

    def export(state: dict[str, torch.Tensor], directory: Path) -> None:
        if lora_cfg is not None:
            save_adapter_tensors(state, model.args, lora_cfg, directory, base_model=base_name)
        else:
            from ..formats import hf
            hf.write(directory, model.args, state, tokenizer=tok, chat_template=template,
                     metadata={"license": ckpt.license} if ckpt.license else None)

    card = dict(produced_by="llamaforge finetune", base_model=base_name, args=model.args,
                method={"full": "full fine-tuning", "lora": "LoRA", "qlora": f"QLoRA ({opts['quant']} base)"}[method],
                data_files=[str(opts["data"])] + ([str(opts["val_data"])] if opts["val_data"] else []),
                license=ckpt.license,
                training_config={"seq_len": seq_len, "pack": bool(opts["pack"]), "train_records": len(train_d),
                                 "val_records": len(val_d), "rows": len(rows.rows), "truncated": rows.truncated,
                                 **({"lora_r": lora_cfg.r, "lora_alpha": lora_cfg.alpha,
                                     "lora_dropout": lora_cfg.dropout, "lora_targets": list(lora_cfg.targets)}
                                    if lora_cfg else {})})
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
    import torch

    from ..formats import hf
    from ..lora import load_adapter
    model, ckpt = load_base(base)
    load_adapter(model, adapter, merge=True)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    hf.write(output, model.args, tensors, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template,
             metadata={"license": ckpt.license} if ckpt.license else None,
             dtype={"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    if gguf:
        from ..formats import gguf as gguf_format
        gguf_format.write(gguf, model.args, tensors, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template,
                          qtype=qtype, metadata={"license": ckpt.license} if ckpt.license else None)
    try:
        from ..cards import write_model_card
        write_model_card(output, produced_by="llamaforge merge", base_model=str(ckpt.path or base), args=model.args,
                         method="LoRA merged into the base weights", license=ckpt.license,
                         extra={"adapter": str(Path(adapter).resolve())})
    except ImportError:
        log.warning("llamaforge.cards is not available: %s has no model card", output)
    print(output + (f" and {gguf}" if gguf else ""))
    return 0
