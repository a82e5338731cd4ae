"""`llamaforge align`: preference training on the one trainer — a reward model or DPO.

The pairs are split once by a fixed seed into train and held-out parts (the held-out part is the
validation set and is never trained on); both sides of each pair are rendered with the model's chat
format; the objective (``preference.py``) is handed to the same ``Trainer`` as pretraining and
fine-tuning, so checkpoints, exact resume, logs, curves and model cards come from there.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ..fileio import atomic_write, load_torch_file
from ..formats import hf
from ..lora import LoraConfig, apply_lora, save_adapter_tensors
from .align_inputs import data_files, split_and_base, train_config
from .configs import AlignConfig
from .distributed import setup
from .pairs import PairSource, render_pairs
from .preference import DPOObjective, RewardModel, RewardObjective, reference_table
from .reward import merged_state, write_reward_model
from .trainer import Trainer

log = logging.getLogger(__name__)

METHODS = ("reward", "dpo", "rejection-sampling", "ppo")
REF_FILE = "reference_logps.pt"


def align(options: AlignConfig) -> int:
    """Align a checkpoint: a reward model (--method reward), DPO (--method dpo) or rejection sampling
    (--method rejection-sampling: best of K by --reward, then fine-tuning on the kept answers)."""
    s = run_align(options)
    if options.method == "rejection-sampling":   # its best-of-K report line is printed already
        if s.get("loss") is not None:
            val = s["val_loss"]
            print(f"step {s['step']}: fine-tuning loss {s['loss']:.4f}, validation loss (held-out samples) "
                  f"{val if val is None else round(val, 4)} -> {s['output']}", file=sys.stderr)
        print(f"samples -> {s['samples']}", file=sys.stderr)
        return 0
    if options.method == "ppo":
        print(f"step {s['step']}: loss {s['loss']:.4f}, mean reward of the last rollout {s['score']:.4f}, "
              f"KL(policy || reference) per answer {s['kl']:.4f} -> {s['output']}", file=sys.stderr)
        return 0
    acc = s.get("val_accuracy")
    print(f"step {s['step']}: train loss {s['loss']:.4f}, held-out loss "
          f"{s['val_loss'] if s['val_loss'] is None else round(s['val_loss'], 4)}, held-out pairwise accuracy "
          f"{acc if acc is None else round(acc, 4)} -> {s['output']}", file=sys.stderr)
    return 0


def _method_name(opts: AlignConfig) -> str:
    tune = {"lora": f"LoRA r={opts.lora_r}", "full": "full"}[opts.tune]
    if opts.method == "reward":
        return f"align: reward model, pairwise loss -log sigmoid(r_c - r_r - m) ({tune})"
    extra = f", label smoothing {opts.label_smoothing}" if opts.label_smoothing else ""
    return f"align: DPO ({opts.loss_type}, beta={opts.beta}{extra}) ({tune})"


def run_align(opts: AlignConfig) -> dict:
    """The align command as a library call; returns the trainer's summary (+ held-out accuracy)."""
    if opts.method not in METHODS:
        raise ValueError(f"method {opts.method!r} is not one of {', '.join(METHODS)}")
    if opts.tune not in ("lora", "full"):
        raise ValueError(f"tune {opts.tune!r} is not one of lora, full")
    if not opts.data:
        raise ValueError("no preference data: pass --data FILE.jsonl (or `data:` in the config)")
    if not opts.output:
        raise ValueError("no output folder: pass --output DIR (or `output:` in the config)")
    if opts.method == "rejection-sampling":
        from .rejection import run_rejection
        return run_rejection(opts)
    if opts.method == "ppo":
        from .ppo import run_ppo
        return run_ppo(opts)
    if opts.reward:
        log.warning("--reward is not used by --method %s", opts.method)
    started = time.time()
    cfg = train_config(opts)
    ctx = setup(cfg.strategy)
    train_p, held_p, model, ckpt, template, seq_len = split_and_base(opts)
    tok = ckpt.tokenizer
    progress = cfg.progress and ctx.is_main
    rows = render_pairs(train_p, tok, template, seq_len, progress=progress, source=str(opts.data))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    train = PairSource(rows, seed=cfg.seed, pad_id=pad)
    vrows = render_pairs(held_p, tok, template, seq_len, source=f"{opts.data} (held out)") if held_p else None
    val = PairSource(vrows, shuffle=False, pad_id=pad) if vrows else None

    lora_cfg = None
    if opts.tune == "lora":
        lora_cfg = LoraConfig(r=int(opts.lora_r), alpha=float(opts.lora_alpha), dropout=float(opts.lora_dropout),
                              targets=tuple(opts.lora_targets))
        torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global RNG: same seed, same run
        apply_lora(model, lora_cfg)
    base_name = str(ckpt.path) if ckpt.path else str(opts.model)
    license = ckpt.license

    if opts.method == "reward":
        trained = RewardModel(model, seed=cfg.seed)   # the head stays trainable under LoRA (as PEFT's modules_to_save)
        objective = RewardObjective(trained)

        def export(state: dict[str, torch.Tensor], directory: Path) -> None:
            inner = {k.removeprefix("model."): v for k, v in state.items()}
            write_reward_model(directory, model.args, merged_state(inner, lora_cfg.scaling if lora_cfg else None),
                               tokenizer=tok, chat_template=template, license=license)
    else:
        reference = "table" if opts.precompute_ref else ("adapters" if lora_cfg else "copy")
        trained = model
        objective = DPOObjective(model, beta=float(opts.beta), loss_type=opts.loss_type,
                                 label_smoothing=float(opts.label_smoothing), reference=reference)
        if reference == "table":
            objective.set_reference_table(_reference(objective, train, Path(opts.output), cfg, progress))

        def export(state: dict[str, torch.Tensor], directory: Path) -> None:
            if lora_cfg is not None:
                save_adapter_tensors(state, model.args, lora_cfg, directory, base_model=base_name)
            else:
                hf.write(directory, model.args, state, tokenizer=tok, chat_template=template,
                         metadata={"license": license} if license else None)

    settings = {"method": opts.method, "tune": opts.tune, "seq_len": seq_len, "held_out": opts.held_out,
                "split_seed": opts.split_seed, "train_pairs": len(train_p), "held_out_pairs": len(held_p),
                "train_pairs_used": len(rows.rows), "held_out_pairs_used": len(vrows.rows) if vrows else 0,
                "pairs_left_out_too_long": rows.dropped + (vrows.dropped if vrows else 0)}
    if opts.method == "dpo":
        settings.update(beta=opts.beta, loss_type=opts.loss_type, label_smoothing=opts.label_smoothing,
                        reference={"adapters": "base model (LoRA adapters disabled)", "copy": "frozen copy of the base",
                                   "table": "base model log-probs computed once"}[objective.reference])
    if lora_cfg:
        settings.update(lora_r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        lora_targets=list(lora_cfg.targets))
    card = dict(produced_by=f"llamaforge align --method {opts.method}", base_model=base_name, args=model.args,
                method=_method_name(opts), license=license, training_config=settings,
                data_files=data_files(opts))
    trainer = Trainer(trained, cfg, train, val, export=export, card=card, ctx=ctx, started=started,
                      objective=objective)
    summary = trainer.fit()
    summary["val_accuracy"] = trainer._last("val_accuracy")
    ctx.close()
    return summary


def _reference(objective: DPOObjective, source: PairSource, out: Path, cfg, progress: bool) -> torch.Tensor:
    """The reference log-probs of every training pair: read from output/ when a run saved them, else
    computed (before any training step, so from the starting model) and saved for a resumed run."""
    path = out / REF_FILE
    if path.is_file():
        table = load_torch_file(path, "reference log-probs")
        if isinstance(table, torch.Tensor) and tuple(table.shape) == (len(source), 2):
            return table
        log.warning("%s does not fit these pairs: computing the reference log-probs again", path)
    table = reference_table(objective, source, batch_size=cfg.micro_batch_size, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(table, p))
    return table
