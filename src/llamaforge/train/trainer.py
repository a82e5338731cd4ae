"""The one trainer: batches of (tokens, loss mask) in, checkpoints out, for every training mode.

It knows nothing about where its data comes from (pretraining windows, rendered SFT examples or
preference pairs all arrive as a ``BatchSource``) nor what the model is (full, LoRA or QLoRA:
whatever parameters have ``requires_grad`` are trained). What is optimised is an ``Objective``:
next-token cross-entropy (``LossModule``, the default) or a preference loss (``preference.py``).

Determinism: the samples of step s are the global sample indices [s*G, (s+1)*G) for global batch G;
each rank takes its slice of each micro-batch. So the data position is the step number, the same
global batch gives the same samples on 1 or N processes, and a resumed run sees exactly the samples
it would have seen.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cards import write_model_card
from ..errors import CheckpointError
from ..fileio import atomic_write, atomic_write_json, atomic_write_text
from . import checkpoints
from .checkpoints import STATE_DIR
from .distributed import (DistContext, full_model_state, full_optimizer_state, load_full_states, no_sync, setup,
                          wrap)

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"


class BatchSource(Protocol):
    """Maps global sample indices to a batch: a tuple of tensors the objective reads.

    For language modelling: tokens [B, T+1] int64 and a loss mask [B, T+1], where mask[b, t] says
    whether token t is a training target (predicted from tokens[:t]).
    """

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]: ...

    def __len__(self) -> int: ...


class Objective(Protocol):
    """What the trainer optimises: an nn.Module holding the model as its one child ``model``.

    forward(*batch) returns the loss summed over the batch's units, optionally with a dict of
    metric sums (same units); the trainer divides both by the global unit count, so accumulation
    and processes do not change the mean. units: targets (LM) or pairs (preferences). blank(batch):
    the batch made to contribute nothing (keeps collective forwards in step). curves: extra plot
    panels {title: [metric keys]} beside the loss.
    """

    model: nn.Module
    curves: dict[str, list[str]]

    def __call__(self, *batch: torch.Tensor) -> Any: ...

    def units(self, batch: tuple[torch.Tensor, ...]) -> float: ...

    def n_tokens(self, batch: tuple[torch.Tensor, ...]) -> int: ...

    def blank(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging settings (the `train` part of a training
    command's options: `--train.lr 3e-4`, or `lr:` / `train: {lr: ...}` in its YAML).

    max_steps: optimiser steps
    micro_batch_size: sequences per process per micro-step (global batch = micro * grad_accum * processes)
    grad_accum: micro-steps per optimiser step
    lr: peak learning rate (linear warm-up, then cosine decay to lr * min_lr_ratio)
    precision: auto (bf16 autocast where the CPU/GPU does bf16), fp32 or bf16
    eval_every: validation every N steps (0: never)
    eval_batches: validation batches per evaluation
    save_every: checkpoint every N steps (0: only at the end)
    keep_checkpoints: checkpoints kept in output/checkpoints
    resume: continue from the last checkpoint in output/checkpoints
    progress: show a progress bar
    strategy: ddp or fsdp when launched with torchrun
    max_minutes: stop and save after this much wall time (0: no limit)
    """

    # set by the command from its own `output` option, never a flag of its own
    output: str = field(default="runs/default", metadata={"internal": True})
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0
    precision: str = "auto"            # auto | fp32 | bf16
    gradient_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0                # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 1337
    resume: bool = True
    progress: bool = True
    strategy: str = "ddp"              # ddp | fsdp under torchrun
    max_minutes: float = 0.0           # 0: no time limit; else stop (and save) after this wall time

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown trainer option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} is not one of auto, fp32, bf16")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def _split(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An objective's output: the loss sum alone, or (loss sum, {metric: sum})."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, {})


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0) + v.detach().double()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware does bf16 natively; None means plain float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:  # CPUs with AVX512-BF16 or AMX run bf16 matmuls natively; elsewhere bf16 is slower than fp32
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


class LossModule(nn.Module):
    """Summed next-token cross-entropy over masked targets; the module DDP/FSDP wrap.

    Only the hidden states of target positions go through the vocabulary projection, which saves
    most of that cost for SFT, where prompts are not trained.
    """

    curves: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].bool()
        h = self.model.hidden(inputs)
        logits = self.model.output(h[tmask])
        return F.cross_entropy(logits.float(), targets[tmask], reduction="sum")

    def units(self, batch) -> float:
        return float(batch[1][:, 1:].sum())

    def n_tokens(self, batch) -> int:
        return int(batch[0][:, :-1].numel())

    def blank(self, batch):
        return batch[0], torch.zeros_like(batch[1])


class Trainer:
    """Runs the optimisation loop with checkpoints, validation, logs and exact resume.

    export(state_dict, directory) writes the model files of a checkpoint (HF folder, PEFT adapter);
    card holds write_model_card's descriptive keywords (produced_by, base_model, args, ...);
    started (time.time()) is when the run began, for max_minutes (default: now);
    objective: what is optimised (an Objective wrapping ``model``; default: next-token cross-entropy).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train: BatchSource, val: BatchSource | None = None, *,
                 export: Callable[[dict[str, torch.Tensor], Path], None] | None = None,
                 card: dict[str, Any] | None = None, ctx: DistContext | None = None, started: float | None = None,
                 objective: nn.Module | None = None):
        config.validate()
        self.started = started if started is not None else time.time()  # max_minutes counts from here
        self.cfg, self.train_data, self.val_data = config, train, val
        self.ctx = ctx or setup(config.strategy)
        self.export, self.card = export, dict(card or {})
        self.out = Path(config.output)
        self.model = model.to(self.ctx.device)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.amp = autocast_dtype(config.precision, self.ctx.device)
        if objective is not None and objective.model is not model:
            raise ValueError("the objective must wrap the model being trained (as its `model`)")
        self.loss_module = (objective or LossModule(self.model)).to(self.ctx.device)
        self.trainable = [n for n, p in self.loss_module.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.wrapped = wrap(self.loss_module, self.ctx, list(getattr(self.model, "layers", [])))
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0

    # ------------------------------------------------------------------ the loop
    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.ctx.world_size

    def _micro_indices(self, step: int, micro: int) -> list[int]:
        """This rank's sample indices in micro-batch `micro` of `step`."""
        b, w = self.cfg.micro_batch_size, self.ctx.world_size
        start = step * self.global_batch + (micro * w + self.ctx.rank) * b
        return list(range(start, start + b))

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.ctx.device.type, enabled=False)
        return torch.autocast(self.ctx.device.type, dtype=self.amp)

    def fit(self) -> dict[str, Any]:
        """Train to max_steps (resuming from the latest checkpoint in output/ when there is one)."""
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.seed + ctx.rank)
        if ctx.is_main:
            checkpoints.recover(self.out / "checkpoints")  # a save cut by a kill: its complete copy counts
        ctx.barrier()
        if cfg.resume:
            self._try_resume()
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log()
        ctx.barrier()
        bar = None
        if ctx.is_main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0, deadline = time.perf_counter(), (self.started + cfg.max_minutes * 60) if cfg.max_minutes > 0 else None
        self.wrapped.train()
        last_val = None
        while self.step < cfg.max_steps:
            rec = self._train_step()
            self.step += 1
            rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
            if cfg.eval_every and self.val_data is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                rec.update(self._val_record())
                last_val = rec["val_loss"]
            self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
            out_of_time = deadline is not None and self._agree(time.time() > deadline)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps and not out_of_time:
                self.save_checkpoint()
            if out_of_time:
                log.warning("max_minutes=%g reached at step %d: stopping", cfg.max_minutes, self.step)
                break
        if bar is not None:
            bar.close()
        if self.val_data is not None and cfg.eval_every and (not self.history or "val_loss" not in self.history[-1]):
            rec = {"step": self.step, **self._val_record()}
            last_val = rec["val_loss"]
            self._log(rec)
        final = self.save_checkpoint()
        self.save_final(final)
        return {"step": self.step, "loss": self._last("loss"), "val_loss": last_val, "checkpoint": str(final),
                "output": str(self.out), "tokens": self.tokens_seen}

    def _agree(self, flag: bool) -> bool:
        """Ranks must agree on stopping (a clock can differ between processes)."""
        t = self.ctx.all_reduce_sum(torch.tensor([int(flag)], device=self.ctx.device))
        return bool(t.item())

    def _train_step(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        obj = self.loss_module
        micro = [self.train_data.batch(self._micro_indices(self.step, m)) for m in range(cfg.grad_accum)]
        n_targets = torch.tensor([float(sum(obj.units(b) for b in micro))], device=ctx.device)
        ctx.all_reduce_sum(n_targets)
        denom = max(1.0, float(n_targets.item()))
        loss_sum = torch.zeros((), device=ctx.device)
        sums: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(micro):
            batch = tuple(t.to(ctx.device) for t in batch)
            with no_sync(self.wrapped, ctx, last=m == len(micro) - 1), self._autocast():
                loss, metrics = _split(self.wrapped(*batch))
            # DDP averages gradients over ranks: scale so the result is the global unit (token, pair) mean
            (loss * (ctx.world_size / denom)).backward()
            loss_sum += loss.detach().float()
            _accumulate(sums, metrics)
            self.tokens_seen += obj.n_tokens(batch) * ctx.world_size
        ctx.all_reduce_sum(loss_sum)
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, "loss": float(loss_sum.item()) / denom, **self._means(sums, denom),
                "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(norm), "targets": int(denom),
                "tokens": self.tokens_seen}

    def _means(self, sums: dict[str, torch.Tensor], denom: float) -> dict[str, float]:
        """Global means of metric sums (every rank has the same keys: same objective, same batch shape)."""
        out = {}
        for k in sorted(sums):
            out[k] = float(self.ctx.all_reduce_sum(sums[k].detach().double()).item()) / denom
        return out

    def evaluate(self) -> float:
        """Mean validation loss (per target token for LM, per pair for preferences)."""
        return self.evaluate_metrics()["loss"]

    def _val_record(self) -> dict[str, float]:
        return {f"val_{k}": v for k, v in self.evaluate_metrics().items()}

    @torch.no_grad()
    def evaluate_metrics(self) -> dict[str, float]:
        """Mean loss (and the objective's metrics) over the first eval_batches * micro_batch_size
        validation samples.

        The samples are the same whatever the number of processes; each rank scores every world_size-th.
        """
        cfg, ctx, obj = self.cfg, self.ctx, self.loss_module
        self.wrapped.eval()
        n = min(len(self.val_data), cfg.eval_batches * cfg.micro_batch_size)
        mine = list(range(ctx.rank, n, ctx.world_size))
        rounds = -(-len(range(0, n, ctx.world_size)) // cfg.micro_batch_size)  # the same on every rank
        total = torch.zeros(2, device=ctx.device, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        for r in range(rounds):
            idx = mine[r * cfg.micro_batch_size:(r + 1) * cfg.micro_batch_size]
            batch = self.val_data.batch(idx or [0])
            if not idx:  # keep collective forwards (FSDP) in step; contributes nothing
                batch = obj.blank(batch)
            batch = tuple(t.to(ctx.device) for t in batch)
            with self._autocast():
                loss, metrics = _split(self.wrapped(*batch))
            total[0] += loss.double()
            total[1] += obj.units(batch)
            _accumulate(sums, metrics)
        ctx.all_reduce_sum(total)
        self.wrapped.train()
        if total[1] <= 0:
            return {"loss": float("nan")}
        return {"loss": float(total[0] / total[1]), **self._means(sums, float(total[1]))}

    # ------------------------------------------------------------------ logging
    def _log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if not self.ctx.is_main:
            return
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("step %s %s", rec.get("step"), {k: v for k, v in rec.items() if k != "step"})

    def _last(self, key: str):
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def _truncate_log(self) -> None:
        """Drop log lines past the resumed step: the resumed run writes them again."""
        path = self.out / LOG_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= self.step:
                keep.append(rec)
        if self.step == 0:
            keep = []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        self.history = keep

    def plot(self, path: Path) -> Path | None:
        """Train (and validation) loss against step as a PNG; one more panel per objective curve."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed: no loss-curve plot")
            return None
        panels = {"loss": ["loss"], **getattr(self.loss_module, "curves", {})}
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels.items()):
            for key in keys:
                train = [(r["step"], r[key]) for r in self.history if key in r]
                val = [(r["step"], r["val_" + key]) for r in self.history if "val_" + key in r]
                if train:
                    ax.plot(*zip(*train), label=f"train {key}" if len(keys) > 1 else "train", lw=1)
                if val:
                    ax.plot(*zip(*val), "o-", label=f"validation {key}" if len(keys) > 1 else "validation", lw=1.5)
            ax.set_xlabel("step")
            ax.set_ylabel(getattr(self.loss_module, "loss_label", "loss (nats/token)") if title == "loss" else title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write output/checkpoints/step-N: a complete temp copy, then swapped in (see checkpoints.py)."""
        ctx = self.ctx
        model_state = full_model_state(self.wrapped, ctx)          # collective under FSDP
        optim_state = full_optimizer_state(self.wrapped, self.optimizer, ctx)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        rngs = [None] * ctx.world_size
        if ctx.enabled:
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        final = self.out / "checkpoints" / f"step-{self.step:06d}"
        if ctx.is_main:
            inner = {k.removeprefix("model."): v for k, v in model_state.items()}
            trained = {k.removeprefix("model."): model_state[k] for k in self.trainable if k in model_state}
            tmp = checkpoints.temp_folder(final)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
            # tensors and plain containers only: resuming loads them with weights_only=True
            torch.save(trained, tmp / STATE_DIR / "model.pt")
            torch.save(optim_state, tmp / STATE_DIR / "optimizer.pt")
            torch.save(rngs, tmp / STATE_DIR / "rng.pt")
            if self.export is not None:
                self.export(inner, tmp)
            self.plot(tmp / CURVE_FILE)
            if (self.out / LOG_FILE).exists():
                # the numbers behind the chart travel with it: the model card summarises this copy
                shutil.copyfile(self.out / LOG_FILE, tmp / LOG_FILE)
            self._write_card(tmp)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": ctx.world_size,
                     "global_batch": self.global_batch, "config": asdict(self.cfg)}
            atomic_write_json(tmp / STATE_DIR / "state.json", state)  # last: the copy is complete
            checkpoints.publish(tmp, final)
            checkpoints.prune(final.parent, self.cfg.keep_checkpoints)
            log.info("checkpoint %s", final)
        ctx.barrier()
        return final

    def save_final(self, checkpoint: Path) -> None:
        """Copy the last checkpoint's model files (not its trainer state) into output/ itself."""
        if not self.ctx.is_main:
            self.ctx.barrier()
            return
        for f in sorted(checkpoint.iterdir()):
            if f.is_file() and f.name != LOG_FILE:   # output/ keeps the live log (a superset of the copy)
                atomic_write(self.out / f.name, lambda tmp, src=f: shutil.copyfile(src, tmp))
        self.ctx.barrier()

    def _write_card(self, directory: Path) -> None:
        if not self.card:
            return
        card = dict(self.card)
        results = dict(card.pop("eval_results", None) or {})
        val = self._last("val_loss")
        if val is not None:
            results["validation_loss"] = round(val, 4)
        results["train_loss"] = round(self._last("loss") or float("nan"), 4)
        training = {**asdict(self.cfg), "steps_done": self.step, "tokens_seen": self.tokens_seen,
                    "world_size": self.ctx.world_size, "global_batch": self.global_batch,
                    **(card.pop("training_config", None) or {})}
        try:
            write_model_card(directory, training_config=training, eval_results=results,
                             loss_curve=CURVE_FILE if (directory / CURVE_FILE).exists() else None, **card)
        except Exception as e:  # noqa: BLE001 - a card problem must not lose a checkpoint
            log.warning("model card for %s failed: %s", directory, e)

    def _try_resume(self) -> None:
        ckpts = checkpoints.complete_checkpoints(self.out / "checkpoints")
        if not ckpts:
            return
        ck = ckpts[-1]
        state_dir = ck / STATE_DIR
        step, tokens_seen, saved_batch = checkpoints.read_progress(state_dir)
        if saved_batch != self.global_batch:
            raise ValueError(f"{ck}: saved with global batch {saved_batch}, now {self.global_batch}; "
                             "resume with the same micro_batch_size * grad_accum * processes")
        trained = checkpoints.load_model_state(state_dir)
        optim_state = checkpoints.load_optimizer_state(state_dir)
        rngs = checkpoints.load_rng_states(state_dir)
        try:
            load_full_states(self.wrapped, self.optimizer, {"model." + k: v for k, v in trained.items()},
                             optim_state, self.ctx)
            rng = rngs[self.ctx.rank] if self.ctx.rank < len(rngs) else rngs[0]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{state_dir}: the saved state does not fit this model and optimizer: {e}") from e
        self.step, self.tokens_seen = step, tokens_seen
        log.info("resumed from %s at step %d", ck, self.step)

