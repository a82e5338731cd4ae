"""The byte-level BPE backend (tokenizer.json, GGUF ``tokenizer.ggml.model = gpt2``).

The algorithm is the `tokenizers` library's; this module rebuilds its model from GGUF metadata, with
llama.cpp's pre-tokenizers.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from .base import Tokenizer, TokenType, as_list, gguf_id, read_hf_config

# texts longer than this are encoded without holding the GIL (see _encode)
_GIL_FREE_CHARS = 16384

# Pre-tokenizer regexes of llama.cpp (llama-vocab.cpp), applied one after another, each splitting the
# pieces the previous one left ("isolated" in `tokenizers` terms).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
}
_PRE_ALIASES = {
    "gpt2": "gpt-2", "phi-2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
}
# llama.cpp turns these on for the Llama 3 family: a word already in the vocab is taken whole.
_IGNORE_MERGES = {"llama-bpe"}
_ADD_BOS_DEFAULT = {"llama-bpe"}

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


def canonical_pre(pre: str | None) -> str:
    """llama.cpp's name for a tokenizer.ggml.pre value (unknown ones fall back to 'default')."""
    if pre is None:
        return "default"
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}; using llama.cpp's 'default' pre-tokenizer", stacklevel=3)
        return "default"
    return pre


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    stages = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    stages.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(stages)


def _split_stages(node: dict | None) -> tuple[str, ...] | None:
    """The regex stages a tokenizer.json pre_tokenizer applies, or None when it is not plain byte-level."""
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for child in node.get("pretokenizers", []):
            got = _split_stages(child)
            if got is None:
                return None
            out.extend(got)
        return tuple(out)
    if kind == "ByteLevel":
        return (_GPT2,) if node.get("use_regex", True) else ()
    if kind == "Digits":
        return (r"\p{N}",) if node.get("individual_digits") else (r"\p{N}+",)
    if kind == "Split" and node.get("behavior") == "Isolated" and not node.get("invert"):
        pattern = node.get("pattern", {})
        return (pattern["Regex"],) if "Regex" in pattern else (re.escape(pattern.get("String", "")),)
    return None


def _detect_pre(tk_json: dict) -> str | None:
    stages = _split_stages(tk_json.get("pre_tokenizer"))
    if stages is None:
        return None
    for name, regexes in PRE_TOKENIZERS.items():
        if tuple(regexes) == stages:
            return name
    return None


class BPETokenizer(Tokenizer):
    """A `tokenizers` model, kept twice: as loaded, and with special tokens read as plain text."""

    kind = "bpe"
    gguf_model = "gpt2"
    file_suffixes = (".json",)

    def __init__(self, tk: tokenizers.Tokenizer, pre: str | None = None) -> None:
        self._tk = tk
        self._tk_plain = _plain(tk)
        ids = tk.get_vocab(with_added_tokens=True).values()
        super().__init__(max(ids) + 1 if ids else 0,
                         {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special})
        if pre is None:
            try:
                pre = _detect_pre(json.loads(tk.to_str()))
            except (ValueError, KeyError):
                pre = None
        self.pre = pre   # llama.cpp's pre-tokenizer name, None when it has none

    @classmethod
    def from_file(cls, path: Path) -> "BPETokenizer":
        tk = tokenizers.Tokenizer.from_file(str(path))
        self = cls(tk)
        vocab = tk.get_vocab(with_added_tokens=True)
        self.bos_id = next((vocab[t] for t in _BOS_GUESSES if t in vocab), None)
        self.eos_id = next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)
        unk = self.tokenizer_json().get("model", {}).get("unk_token")
        self.unk_id = vocab.get(unk) if isinstance(unk, str) else None
        cfg = read_hf_config(path.parent)
        self._apply_hf_config(cfg)
        if "add_bos_token" not in cfg and self.bos_id is not None:
            # No config: the post-processor tells whether BOS is added.
            with_special = tk.encode("a", add_special_tokens=True).ids
            self.add_bos = bool(with_special) and with_special[0] == self.bos_id
        return self._finish()

    @classmethod
    def from_gguf_vocab(cls, kv: dict, tokens: list[str], types: list[int]) -> "BPETokenizer":
        pre = canonical_pre(kv.get("tokenizer.ggml.pre"))
        self = cls(_bpe_from_gguf(kv, tokens, types, pre), pre)
        self.bos_id = gguf_id(kv, "tokenizer.ggml.bos_token_id", None)
        self.eos_id = gguf_id(kv, "tokenizer.ggml.eos_token_id", None)
        self.unk_id = gguf_id(kv, "tokenizer.ggml.unknown_token_id", None)
        self.pad_id = gguf_id(kv, "tokenizer.ggml.padding_token_id", None)
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", pre in _ADD_BOS_DEFAULT))
        return self

    def tokenizer_json(self) -> dict:
        """The model as tokenizer.json holds it."""
        return json.loads(self._tk.to_str())

    def added_tokens(self) -> dict[int, Any]:
        """id -> tokenizers.AddedToken of the tokens added on top of the BPE vocabulary."""
        return self._tk.get_added_tokens_decoder()

    def _encode(self, text: str, special: bool) -> list[int]:
        tk = self._tk if special else self._tk_plain
        if len(text) > _GIL_FREE_CHARS:
            # encode() holds the GIL for its whole run (3.4 s for 4 MB, freezing a server's other
            # streams); encode_batch() releases it and gives the same ids
            return list(tk.encode_batch([text], add_special_tokens=False)[0].ids)
        return list(tk.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def _piece(self, i: int) -> str:
        piece = self._tk.id_to_token(i)
        if piece is None:
            raise IndexError(f"token id {i} has no piece")
        return piece

    def token(self, i: int) -> str | None:
        """The vocabulary entry of id ``i``, None for a hole in the ids."""
        return self._tk.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        if piece is None:
            return None
        return self._tk.token_to_id(piece)

    def _is_control(self, i: int) -> bool:
        return self._tk.id_to_token(i) in self._special_ids

    def _save_model(self, directory: Path) -> dict[str, Any]:
        self._tk.save(str(directory / "tokenizer.json"))
        return {"tokenizer_class": "PreTrainedTokenizerFast"}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_tk=self._tk.to_str(), _tk_plain=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tk = tokenizers.Tokenizer.from_str(state["_tk"])
        self._tk_plain = _plain(self._tk)


def _plain(tk: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of ``tk`` that reads special-token texts as plain text (encode(special=False))."""
    plain = tokenizers.Tokenizer.from_str(tk.to_str())
    plain.encode_special_tokens = True
    return plain


def _bpe_from_gguf(kv: dict, tokens: list[str], types: list[int], pre: str) -> tokenizers.Tokenizer:
    merges_raw = as_list(kv.get("tokenizer.ggml.merges"))
    if not merges_raw and "tokenizer.ggml.merges" not in kv:
        raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        m = m.decode("utf-8") if isinstance(m, (bytes, bytearray)) else m
        cut = m.find(" ", 1)  # llama.cpp's rule: the separator is the first space after position 0
        if cut < 0:
            raise ValueError(f"malformed merge {m!r}")
        merges.append((m[:cut], m[cut + 1:]))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tk = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    tk.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == TokenType.CONTROL]
    user = [tokenizers.AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk
