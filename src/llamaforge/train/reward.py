"""Reward models on disk: written as transformers' ``LlamaForSequenceClassification`` (num_labels=1),
read back as a ``Reward`` that scores conversations, and the `llamaforge score` command.

The folder is an HF Llama folder (config.json, model.safetensors, tokenizer files) whose
architecture is ``LlamaForSequenceClassification`` and whose weights are ``model.*`` plus
``score.weight`` [1, dim]; transformers reads the score at the last non-padding token, which is what
``RewardModel`` reads, so both give the same scores. A LoRA-trained reward model is written with its
adapters merged into the weights.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import from_hf_config
from ..fileio import atomic_write, atomic_write_json
from ..formats import hf
from ..formats.checkpoint import CheckpointError
from ..formats.common import load_tokenizer, read_json
from ..model import Transformer
from .data import record_to_messages, render_example
from .preference import RewardModel

log = logging.getLogger(__name__)

SCORE = "score.weight"


def merged_state(state: dict[str, torch.Tensor], scaling: float | None) -> dict[str, torch.Tensor]:
    """Meta-named tensors with LoRA factors folded in: ``x.base.weight`` + scaling·B@A -> ``x.weight``."""
    out = {}
    for k, v in state.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        m = re.fullmatch(r"(.+)\.base\.weight", k)
        if m is None:
            out[k] = v
            continue
        a, b = state.get(m.group(1) + ".lora_A"), state.get(m.group(1) + ".lora_B")
        w = v.float()
        if a is not None and b is not None and scaling is not None:
            w = w + (b.float() @ a.float()) * scaling
        out[m.group(1) + ".weight"] = w.to(v.dtype)
    return out


def export_pad_id(tokenizer) -> int:
    """A padding id that never ends a rendered conversation (transformers scores the last non-pad token)."""
    ends = {tokenizer.eos_id, tokenizer.bos_id}
    for cand in (tokenizer.pad_id, getattr(tokenizer, "unk_id", None), 0):
        if cand is not None and cand >= 0 and cand not in ends:
            return int(cand)
    return 0


def write_reward_model(directory: str | Path, args, state: dict[str, torch.Tensor], *, tokenizer=None,
                       chat_template: str | None = None, license: str | None = None) -> Path:
    """An HF folder transformers loads as LlamaForSequenceClassification(num_labels=1).

    state: Meta-named model tensors plus ``score.weight`` (LoRA already merged).
    """
    state = dict(state)
    score = state.pop(SCORE).detach().float().cpu().reshape(1, args.dim)
    state.pop("output.weight", None)  # the LM head has no place in a classifier; keep config checks happy below
    base = {k: v.detach().float().cpu() for k, v in state.items()}
    if not args.tie_embeddings:  # check_tensors wants it; dropped again from the file below
        base["output.weight"] = torch.zeros(args.vocab_size, args.dim)
    d = hf.write(directory, args, base, tokenizer=tokenizer, chat_template=chat_template,
                 metadata={"license": license} if license else None)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    tensors[SCORE] = score
    atomic_write(d / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    cfg = read_json(d / "config.json", "config")
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, problem_type="regression",
               pad_token_id=export_pad_id(tokenizer) if tokenizer is not None else 0)
    atomic_write_json(d / "config.json", cfg)
    return d


def read_reward_model(path: str | Path) -> tuple[RewardModel, Any, str | None]:
    """(RewardModel, tokenizer, chat template) of a folder written by write_reward_model."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a reward model folder)")
    cfg = read_json(cfg_file, "config")
    if "LlamaForSequenceClassification" not in (cfg.get("architectures") or []) or cfg.get("num_labels", 1) != 1:
        raise ValueError(f"{cfg_file}: not a one-label LlamaForSequenceClassification (a reward model)")
    try:
        args = from_hf_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: unsupported or invalid config: {e}") from e
    wfile = folder / "model.safetensors"
    if not wfile.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - corrupted headers raise several exception types
        raise CheckpointError(f"{wfile}: cannot read safetensors weights: {e}") from e
    if SCORE not in raw:
        raise CheckpointError(f"{wfile}: no {SCORE} (not a reward model)")
    score = raw.pop(SCORE).float()
    tensors = {}
    for name, t in raw.items():
        meta = hf.hf_to_meta_name(name)
        if meta is None:
            raise CheckpointError(f"{wfile}: unexpected tensor {name!r}")
        heads = args.n_heads if meta.endswith("attention.wq.weight") else (
            args.kv_heads if meta.endswith("attention.wk.weight") else None)
        tensors[meta] = (hf.unpermute_hf(t, heads) if heads else t).float()
    model = Transformer.empty(args).load_tensors(tensors, strict=args.tie_embeddings)
    rm = RewardModel(model)
    with torch.no_grad():
        rm.score.weight.copy_(score.reshape(1, args.dim))
    tok_file = next((folder / f for f in ("tokenizer.model", "tokenizer.json") if (folder / f).is_file()), None)
    if tok_file is None:
        raise FileNotFoundError(f"{folder}: no tokenizer.model or tokenizer.json")
    tok = load_tokenizer(tok_file)
    template = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        template = read_json(tc, "tokenizer_config.json").get("chat_template")
    return rm.eval(), tok, template or getattr(tok, "chat_template", None)


class Reward:
    """A trained reward model: ``Reward.load(dir).score(messages)`` -> float (higher = preferred)."""

    def __init__(self, model: RewardModel, tokenizer, template: str | None):
        self.model, self.tokenizer, self.template = model, tokenizer, template

    @classmethod
    def load(cls, path: str | Path) -> "Reward":
        return cls(*read_reward_model(path))

    def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered as in training (the model's chat format)."""
        return render_example(self.tokenizer, messages, self.template)[0]

    @torch.no_grad()
    def score_tokens(self, rows: Sequence[Sequence[int]]) -> list[float]:
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        return self.model(tokens, lengths).tolist()

    def score(self, messages: list[dict[str, str]] | Sequence[list[dict[str, str]]], *, batch_size: int = 8):
        """The reward of one conversation (a list of messages), or a list of rewards for a list of them."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        rows = [self.tokens(m) for m in convs]
        out: list[float] = []
        for s in range(0, len(rows), batch_size):
            out += self.score_tokens(rows[s:s + batch_size])
        return out[0] if single else out


def score(reward: str, data: str, *, output: str | None = None, batch_size: int = 8) -> int:
    """Score the conversations of a JSONL file with a reward model (pairs: both sides and the accuracy).

    reward: reward model folder written by `llamaforge align --method reward`
    data: JSONL: conversations ({"messages"} or any `finetune` record) or preference pairs ({"chosen", "rejected", ...})
    output: write one JSON line per record here (default: stdout)
    batch_size: conversations per forward pass
    """
    rm = Reward.load(reward)
    p = Path(data)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: data file not found")
    from .pairs import read_preference_jsonl
    lines = []
    with _open(p) as f:
        first = next((ln for ln in f if ln.strip()), None)
    if first is None:
        raise ValueError(f"{p}: no records")
    try:
        rec = json.loads(first)
    except ValueError as e:
        raise ValueError(f"{p}:1: invalid JSON: {e}") from None
    right = n = 0
    if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        pairs = read_preference_jsonl(p)
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            scores = rm.score([x.chosen for x in chunk] + [x.rejected for x in chunk], batch_size=batch_size)
            for i in range(len(chunk)):
                c, r = scores[i], scores[len(chunk) + i]
                right, n = right + (c > r), n + 1
                lines.append({"chosen": c, "rejected": r, "correct": c > r})
    else:
        convs = []
        with _open(p) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    convs.append(record_to_messages(json.loads(line)))
                except ValueError as e:
                    raise ValueError(f"{p}:{lineno}: {e}") from None
        lines = [{"score": s} for s in rm.score(convs, batch_size=batch_size)]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    if output:
        atomic_write(Path(output), lambda q: q.write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    if n:
        print(f"pairwise accuracy {right / n:.4f} ({right}/{n})", file=sys.stderr)
    return 0


def _open(p: Path):
    import gzip
    return gzip.open(p, "rt", encoding="utf-8") if p.name.endswith(".gz") else open(p, encoding="utf-8")


__all__ = ["Reward", "RewardModel", "write_reward_model", "read_reward_model", "merged_state", "score"]
