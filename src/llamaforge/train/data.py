"""Training data: tokenizer training, pretokenized token shards, and SFT examples with loss masks.

Everything ends as a ``BatchSource`` for the trainer: global sample index -> (tokens [B, T+1],
loss mask [B, T+1]). Pretraining samples are random windows of memory-mapped token shards; SFT
samples are rendered chat examples (one per row, or packed several to a row).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import (B_INST, B_SYS, E_INST, E_SYS, ChatFormatError, _control_texts, _refuse_special_tags,
                    is_llama2_template, render_template, validate_messages)
from ..fileio import atomic_write, atomic_write_text
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

META_FILE = "meta.json"


# ---------------------------------------------------------------- tokenizer training

def train_sentencepiece(corpus: Sequence[str | Path], output: str | Path, *, vocab_size: int = 4096,
                        max_sentences: int = 2_000_000, threads: int | None = None) -> Path:
    """Train a sentencepiece tokenizer the Llama 2 way; returns the folder holding tokenizer.model.

    Llama 2's recipe: BPE, byte fallback (no unknown bytes), digits split into single tokens, no text
    normalisation, whitespace kept as is, ids 0/1/2 = <unk>/<s>/</s>.
    """
    import sentencepiece as spm
    files = [Path(c) for c in corpus]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: corpus file not found")
        if f.stat().st_size == 0:
            raise ValueError(f"{f}: corpus file is empty")
    if vocab_size < 256 + 3 + 8:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".sp-") as tmp:
        prefix = Path(tmp) / "tokenizer"
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(str(f) for f in files), model_prefix=str(prefix), model_type="bpe",
                vocab_size=vocab_size, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                split_by_unicode_script=True, split_by_whitespace=True, character_coverage=0.99995,
                max_sentence_length=1 << 16, input_sentence_size=max_sentences, shuffle_input_sentence=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=threads or max(1, os.cpu_count() or 1),
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {e}") from e
        os.replace(f"{prefix}.model", out / "tokenizer.model")
    return out


def load_tokenizer(path: str | Path):
    """llamaforge's Tokenizer for a tokenizer folder or file (or a checkpoint's own tokenizer)."""
    return Tokenizer.load(path)


# ---------------------------------------------------------------- pretokenized shards

def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _documents(path: Path, chunk_chars: int = 1 << 20) -> Iterable[str]:
    """Text pieces of a file, cut at blank lines so large files never sit in memory twice."""
    with open(path, encoding="utf-8", errors="strict") as f:
        buf = ""
        for line in f:
            buf += line
            if len(buf) >= chunk_chars and line.strip() == "":
                yield buf
                buf = ""
        if buf:
            yield buf


def pretokenize_files(inputs: Sequence[str | Path], tokenizer_path: str | Path, output: str | Path, *,
                      val_fraction: float = 0.05, shard_tokens: int = 50_000_000, progress: bool = True) -> dict:
    """Tokenize text files once into memory-mapped shards: output/train_NNN.bin, output/val_000.bin, meta.json.

    Each file is one document: BOS + tokens + EOS. The last ``val_fraction`` of the token stream is
    held out as the validation shard.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    files = [Path(p) for p in inputs]
    if not files:
        raise ValueError("no input files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: input text file not found")
    tok = load_tokenizer(tokenizer_path)
    dtype = _token_dtype(tok.vocab_size)
    total_bytes = sum(f.stat().st_size for f in files)
    ids: list[np.ndarray] = []
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for f in files:
            doc = [tok.bos_id] if tok.bos_id is not None else []
            parts = [np.asarray(doc, dtype=np.int64)]
            for piece in _documents(f):
                parts.append(np.asarray(tok.encode(piece), dtype=np.int64))
                bar.update(len(piece.encode("utf-8")))
            if tok.eos_id is not None:
                parts.append(np.asarray([tok.eos_id], dtype=np.int64))
            ids.append(np.concatenate(parts))
    stream = np.concatenate(ids).astype(dtype)
    n_val = max(1, int(len(stream) * val_fraction))
    if len(stream) - n_val < 2:
        raise ValueError(f"only {len(stream)} tokens: too little text to split into train and validation")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train, val = stream[:-n_val], stream[-n_val:]
    shards = {"train": [], "val": []}
    for split, arr in (("train", train), ("val", val)):
        for i, start in enumerate(range(0, len(arr), shard_tokens)):
            name = f"{split}_{i:03d}.bin"
            atomic_write(out / name, lambda p, part=arr[start:start + shard_tokens]: p.write_bytes(part.tobytes()))
            shards[split].append({"file": name, "tokens": int(min(shard_tokens, len(arr) - start))})
    meta = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "tokenizer": str(Path(tokenizer_path).resolve()),
            "inputs": [str(f.resolve()) for f in files], "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "shards": shards}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    log.info("%d train + %d validation tokens in %s", len(train), len(val), out)
    return meta


class TokenShards:
    """The concatenated, memory-mapped token stream of one split of a pretokenized folder."""

    def __init__(self, folder: str | Path, split: str = "train"):
        folder = Path(folder)
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder}: no {META_FILE}; run `llamaforge pretokenize` first")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self.arrays = [np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in self.meta["shards"][split]]
        if not self.arrays:
            raise ValueError(f"{folder}: no {split} shards")
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        out, pos = [], start
        while length > 0:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            a, local = self.arrays[i], pos - int(self.offsets[i])
            take = min(length, len(a) - local)
            out.append(np.asarray(a[local:local + take], dtype=np.int64))
            pos, length = pos + take, length - take
        return np.concatenate(out)


class PretrainSource:
    """Windows of seq_len+1 tokens: random offsets (seeded by sample index) or consecutive (validation)."""

    def __init__(self, shards: TokenShards, seq_len: int, *, seed: int = 0, random: bool = True):
        if len(shards) < seq_len + 2:
            raise ValueError(f"{len(shards)} tokens are fewer than one sequence of {seq_len + 1}")
        self.shards, self.seq_len, self.seed, self.random = shards, seq_len, seed, random

    def __len__(self) -> int:
        return len(self.shards) // (self.seq_len + 1)

    def _start(self, k: int) -> int:
        span = len(self.shards) - self.seq_len - 1
        if self.random:
            return int(np.random.default_rng([self.seed, k]).integers(0, span + 1))
        return (k % len(self)) * (self.seq_len + 1)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.shards.window(self._start(k), self.seq_len + 1) for k in indices])
        tokens = torch.from_numpy(rows)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)


# ---------------------------------------------------------------- SFT examples

def record_to_messages(rec: Any) -> list[dict[str, str]]:
    """Normalise one JSONL record (chat, instruction, prompt/completion or question/answer) to messages."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")

    def text(key: str, required: bool = True) -> str:
        v = rec.get(key)
        if v is None and not required:
            return ""
        if not isinstance(v, str):
            raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
        return v

    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': str, 'content': str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("the dialogue has no assistant message to learn from")
        out = []
        for i, m in enumerate(msgs):
            out.append({"role": m["role"], "content": m["content"]})
            if "weight" in m:  # OpenAI's fine-tuning convention: weight 0 = no loss on this reply
                if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], float):
                    raise ValueError(f"messages[{i}]: 'weight' must be 0 or 1 and only on assistant messages")
                out[-1]["weight"] = int(m["weight"])
        return out
    if "instruction" in rec:
        inp = text("input", required=False)
        user = text("instruction") + (f"\n\n{inp}" if inp.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": text("output")}]
    if "prompt" in rec:
        return [{"role": "user", "content": text("prompt")}, {"role": "assistant", "content": text("completion")}]
    if "question" in rec:
        return [{"role": "user", "content": text("question")}, {"role": "assistant", "content": text("answer")}]
    raise ValueError(f"unrecognised record with keys {sorted(rec)}: expected 'messages', "
                     "'instruction'/'output', 'prompt'/'completion' or 'question'/'answer'")


def read_jsonl(path: str | Path, convert, limit: int | None = None, what: str = "data") -> list:
    """convert(record) for each record of a JSONL (or .jsonl.gz) file, up to `limit`; a bad record
    (invalid JSON, or convert's ValueError) raises ValueError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} file not found")
    opener = gzip.open if p.name.endswith(".gz") else open
    out: list = []
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{p}:{lineno}: invalid JSON: {e}") from None
                try:
                    out.append(convert(rec))
                except ValueError as e:
                    raise ValueError(f"{p}:{lineno}: {e}") from None
                if limit is not None and len(out) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read: {e}") from None
    if not out:
        raise ValueError(f"{p}: no records")
    return out


def read_sft_jsonl(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """All dialogues of a JSONL file; a bad record raises ValueError naming file and line."""
    return read_jsonl(path, record_to_messages, limit)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_example(tokenizer, messages: list[dict[str, str]], template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a dialogue in the model's chat format and a mask that is 1 on assistant tokens.

    Templates are rendered per turn: the text before each assistant reply (with the generation
    prompt) is context, the reply up to the template's end-of-turn marker is a target. An assistant
    message with ``"weight": 0`` is context too (Ghost Attention's earlier turns).
    """
    # per assistant reply, in order: is it a target (validate_messages drops the extra key)
    targets = [int(m.get("weight", 1)) for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    llama2 = template is None or is_llama2_template(template)
    if template is None and tokenizer.kind != "sentencepiece":
        raise ChatFormatError("the tokenizer has no chat template to render SFT data with")
    msgs = validate_messages(messages, llama2=llama2, require_last_user=False)
    if msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]  # a trailing user turn teaches nothing
    if llama2:  # Meta's reference chat_completion format
        _refuse_special_tags(msgs)
        if msgs[0]["role"] == "system":
            msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
        ids, mask = [], []
        for user, answer, target in zip(msgs[::2], msgs[1::2], targets):
            prompt = tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST}", bos=True)
            full = tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                    bos=True, eos=True)
            n = _common_prefix(prompt, full)
            ids += full
            mask += [0] * n + [target] * (len(full) - n)
        return ids, mask

    control = [t for t in _control_texts(tokenizer) if any(t in m["content"] for m in msgs)]
    if control:
        raise ChatFormatError(f"message content contains control token text {', '.join(map(repr, control))}")
    bos = None if tokenizer.bos_id is None else tokenizer.id_to_piece(tokenizer.bos_id)
    eos = None if tokenizer.eos_id is None else tokenizer.id_to_piece(tokenizer.eos_id)

    def render(ms, gen):
        return render_template(template, ms, bos, eos, add_generation_prompt=gen)

    full = render(msgs, False)
    # character spans [start, end) of each assistant reply inside the full rendering
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = render(msgs[:i], True), render(msgs[:i + 1], False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise ChatFormatError("the chat template does not render dialogues prefix by prefix; "
                                  "cannot tell which tokens are the assistant's")
        cuts.append((len(before), len(upto)))
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    add_bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None and not (bos and full.startswith(bos)))
    if add_bos:
        ids.append(tokenizer.bos_id)
        mask.append(0)
    for (start, end), reply in zip(cuts, targets):
        for text, target in ((full[pos:start], 0), (full[start:end], reply)):
            if text:
                piece = tokenizer.encode(text, special=True)
                ids += piece
                mask += [target] * len(piece)
        pos = end
    return ids, mask


@dataclass
class SFTExamples:
    rows: list[tuple[np.ndarray, np.ndarray]]   # (ids, mask) per row, each at most seq_len+1 tokens
    truncated: int = 0
    dropped: int = 0


def build_sft_rows(dialogues: Sequence[list[dict[str, str]]], tokenizer, template: str | None, seq_len: int, *,
                   pack: bool = False, progress: bool = True, source: str = "data") -> SFTExamples:
    """Render dialogues into rows of at most seq_len+1 tokens; with pack, several examples per row."""
    examples, truncated, dropped = [], 0, 0
    for i, msgs in enumerate(tqdm(dialogues, desc="render", unit="ex", disable=not progress)):
        try:
            ids, mask = render_example(tokenizer, msgs, template)
        except ChatFormatError as e:
            raise ValueError(f"{source}: record {i + 1}: {e}") from None
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            truncated += 1
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.bool_)))
    if truncated:
        log.warning("%s: %d example(s) longer than %d tokens were truncated", source, truncated, seq_len + 1)
    if not examples:
        raise ValueError(f"{source}: no example has an assistant token within {seq_len + 1} tokens")
    if not pack:
        return SFTExamples(examples, truncated, dropped)
    rows, cur_ids, cur_mask, n = [], [], [], 0
    for ids, mask in examples:
        if n + len(ids) > seq_len + 1 and cur_ids:
            rows.append((np.concatenate(cur_ids), np.concatenate(cur_mask)))
            cur_ids, cur_mask, n = [], [], 0
        cur_ids.append(ids)
        cur_mask.append(mask)
        n += len(ids)
    if cur_ids:
        rows.append((np.concatenate(cur_ids), np.concatenate(cur_mask)))
    return SFTExamples(rows, truncated, dropped)


class RowSource:
    """A fixed list of (ids, mask) rows, shuffled per epoch (seeded); batches right-padded with mask 0."""

    def __init__(self, rows: Sequence, *, seed: int = 0, shuffle: bool = True, pad_id: int = 0,
                 what: str = "training rows"):
        if not rows:
            raise ValueError(f"no {what}")
        self.rows, self.seed, self.shuffle, self.pad_id = list(rows), seed, shuffle, pad_id
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _index(self, k: int) -> int:
        """The row behind batch position k (k runs on across epochs; each epoch its own permutation)."""
        epoch, i = divmod(k, len(self.rows))
        if not self.shuffle:
            return i
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return int(self._perm[epoch][i])

    def _row(self, k: int):
        return self.rows[self._index(k)]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows([self._row(k) for k in indices], self.pad_id)


def pad_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, W], mask [n, W]) of (ids, mask) rows, right-padded with pad_id and mask 0."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for j, (ids, m) in enumerate(rows):
        tokens[j, :len(ids)] = torch.from_numpy(ids)
        mask[j, :len(m)] = torch.from_numpy(m)
    return tokens, mask


def split_validation(items: Sequence, val_fraction: float, val_max: int | None, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of max(1, fraction * n) items (capped at val_max)."""
    n = len(items)
    if val_fraction <= 0 or n < 2:
        return list(items), []
    k = max(1, int(n * val_fraction))
    if val_max:
        k = min(k, val_max)
    perm = np.random.default_rng([seed, 7]).permutation(n)
    val_idx = set(perm[:k].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [items[i] for i in sorted(val_idx)]


__all__ = ["train_sentencepiece", "load_tokenizer", "pretokenize_files", "TokenShards", "PretrainSource",
           "record_to_messages", "read_sft_jsonl", "render_example", "build_sft_rows", "RowSource", "pad_rows",
           "split_validation", "SFTExamples"]
