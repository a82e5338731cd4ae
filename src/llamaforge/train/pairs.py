"""Preference pairs: reading JSONL (and HH-RLHF transcripts), the fixed held-out split, rendering
each side with the model's chat format, and the ``BatchSource`` of pairs the trainer reads.

A pair is two conversations that share a prompt and differ in the last assistant reply. Records:

    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0}          (margin optional)
    {"messages": [...prompt turns...], "chosen": "...", "rejected": "..."}
    {"prompt": [...turns...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}   (TRL's shape)
    {"chosen": [...whole conversation...], "rejected": [...whole conversation...]}
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}              (Anthropic HH-RLHF)
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import ChatFormatError
from .data import RowSource, pad_rows, read_jsonl, render_example

log = logging.getLogger(__name__)

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


@dataclass
class Pair:
    chosen: list[dict[str, str]]      # the whole conversation ending in the preferred reply
    rejected: list[dict[str, str]]    # the same prompt ending in the other reply
    margin: float = 0.0


def parse_hh(text: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages.

    Consecutive turns of one speaker (a few transcripts have them) are joined into one message.
    """
    if not isinstance(text, str):
        raise ValueError(f"an HH-RLHF transcript must be a string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF transcript: expected it to start with '\\n\\nHuman: '")
    msgs: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + content.strip()
        else:
            msgs.append({"role": role, "content": content.strip()})
    if msgs[-1]["role"] != "assistant":
        raise ValueError("the HH-RLHF transcript does not end with an Assistant turn")
    return msgs


def _messages(v: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{what!r} must be a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{what}[{i}] must be {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def record_to_pair(rec: Any) -> Pair:
    """One JSONL record (any shape of the module docstring) as a Pair."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(map(repr, missing))} (a preference record needs "
                         "'chosen' and 'rejected', with 'prompt' or 'messages' unless they are whole conversations)")
    margin = rec.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"'margin' must be a number, got {type(margin).__name__}")
    prompt: list[dict[str, str]] | None = None
    if "messages" in rec:
        prompt = _messages(rec["messages"], "messages")
    elif "prompt" in rec:
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    sides = []
    for key in ("chosen", "rejected"):
        v = rec[key]
        if prompt is None:  # whole conversations: HH-RLHF transcripts or message lists
            sides.append(parse_hh(v) if isinstance(v, str) else _messages(v, key))
        elif isinstance(v, str):
            sides.append(prompt + [{"role": "assistant", "content": v}])
        elif isinstance(v, dict):
            sides.append(prompt + _messages([v], key))
        else:
            sides.append(prompt + _messages(v, key))
    for key, msgs in zip(("chosen", "rejected"), sides):
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{key!r} does not end with an assistant reply")
    return Pair(sides[0], sides[1], float(margin))


def read_preference_jsonl(path: str | Path, limit: int | None = None) -> list[Pair]:
    """All pairs of a JSONL (or .jsonl.gz) file; a bad record raises ValueError naming file and line."""
    return read_jsonl(path, record_to_pair, limit, what="preference data")


def split_held_out(items: Sequence, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): a fixed-seed permutation's first round(fraction * n) items are held out.

    Depends only on (n, fraction, seed), never on the training seed, so every run on a file holds out
    the same records and never trains on them.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held_out must be in [0, 1), got {fraction}")
    n = len(items)
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    held = set(np.random.default_rng([seed, 16]).permutation(n)[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def last_reply_mask(mask: Sequence[int]) -> np.ndarray:
    """Only the last run of target tokens: the final assistant reply (with its end-of-turn marker)."""
    m = np.asarray(mask, dtype=np.bool_)
    idx = np.flatnonzero(m)
    out = np.zeros_like(m)
    if len(idx):
        end = int(idx[-1])
        start = end
        while start > 0 and m[start - 1]:
            start -= 1
        out[start:end + 1] = True
    return out


@dataclass
class PairRows:
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]]  # ids_c, mask_c, ids_r, mask_r, margin
    dropped: int = 0


def render_pairs(pairs: Sequence[Pair], tokenizer, template: str | None, seq_len: int, *, progress: bool = False,
                 source: str = "data") -> PairRows:
    """Token ids of both sides of each pair with masks on the last reply; pairs with a side longer than
    seq_len tokens are dropped (a reward read from a cut conversation would score the wrong text)."""
    rows, dropped = [], 0
    for i, pair in enumerate(tqdm(pairs, desc="render", unit="pair", disable=not progress)):
        sides = []
        for msgs in (pair.chosen, pair.rejected):
            try:
                ids, mask = render_example(tokenizer, msgs, template)
            except ChatFormatError as e:
                raise ValueError(f"{source}: pair {i + 1}: {e}") from None
            sides.append((np.asarray(ids, dtype=np.int64), last_reply_mask(mask)))
        if max(len(sides[0][0]), len(sides[1][0])) > seq_len:
            dropped += 1
            continue
        rows.append((sides[0][0], sides[0][1], sides[1][0], sides[1][1], pair.margin))
    if dropped:
        log.warning("%s: %d pair(s) longer than %d tokens were left out", source, dropped, seq_len)
    if not rows:
        raise ValueError(f"{source}: no pair fits in {seq_len} tokens")
    return PairRows(rows, dropped)


class PairSource(RowSource):
    """Pairs as batches: (tokens [2B, W], mask [2B, W], lengths [2B], margin [B], weight [B], index [B]).

    Rows 0..B-1 are the chosen sides, B..2B-1 the rejected ones (one forward for both, as TRL does);
    right-padded with pad_id and mask 0. index is the pair's row number (precomputed reference
    log-probs are looked up by it); weight 0 blanks a pair. Shuffled per epoch with a seeded permutation.
    """

    def __init__(self, rows: PairRows | Sequence, *, seed: int = 0, shuffle: bool = True, pad_id: int = 0):
        super().__init__(rows.rows if isinstance(rows, PairRows) else rows, seed=seed, shuffle=shuffle,
                         pad_id=pad_id, what="preference pairs")

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        picked = [self._index(k) for k in indices]
        sides = [(self.rows[j][0], self.rows[j][1]) for j in picked] + [(self.rows[j][2], self.rows[j][3]) for j in picked]
        tokens, mask = pad_rows(sides, self.pad_id)
        lengths = torch.tensor([len(ids) for ids, _ in sides], dtype=torch.long)
        margin = torch.tensor([self.rows[j][4] for j in picked], dtype=torch.float32)
        return tokens, mask, lengths, margin, torch.ones(len(picked)), torch.tensor(picked, dtype=torch.long)
