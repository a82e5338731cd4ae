"""The tokenizer interface both backends share: loading from any source, Meta's BOS/EOS rules, the
end-of-generation set, Hugging Face tokenizer_config.json, saving."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable

from ..fileio import atomic_write_json
from ..gguf_file import parse


class TokenType:
    """GGUF `tokenizer.ggml.token_type` values (same numbers as sentencepiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Tokens that end a turn when present in the vocab; llama.cpp detects them by text the same way.
EOG_TOKEN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)


def token_content(value: Any) -> str | None:
    """The text of a special token as tokenizer_config.json spells it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def pick_chat_template(value: Any) -> str | None:
    """One template from a chat_template value (a string, or transformers' list of named templates)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def read_hf_config(directory: Path) -> dict:
    """tokenizer_config.json (+ chat_template.jinja, special_tokens_map.json) of a checkpoint folder."""
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = directory / name
        if p.is_file():
            try:
                value = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:  # name the file: the caller only knows the tokenizer's own
                raise ValueError(f"{p}: {e}") from e
            if not isinstance(value, dict):
                raise ValueError(f"{p}: not a JSON object")
            cfg.update(value)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    return cfg


def as_list(value) -> list:
    """A plain list from a GGUF array (list or numpy array); [] for None."""
    if value is None:
        return []
    return value.tolist() if hasattr(value, "tolist") else list(value)


def gguf_id(kv: dict, key: str, default: int | None) -> int | None:
    """An optional token id from GGUF metadata."""
    v = kv.get(key, default)
    return None if v is None else int(v)


def special_pattern(pieces: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of ``pieces``, longest first; None when there are none."""
    pieces = sorted(pieces, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in pieces)) if pieces else None


class Tokenizer(ABC):
    """One tokenizer API over a SentencePiece processor or a `tokenizers` model (see the subclasses).

    Build one with `Tokenizer.load(path)` (tokenizer.model, tokenizer.json, a checkpoint folder or a
    .gguf) or `Tokenizer.from_gguf(kv)`; the backend is picked from what the source holds.
    """

    kind: ClassVar[str]                   # "sentencepiece" | "bpe"
    gguf_model: ClassVar[str]             # tokenizer.ggml.model it reads and writes
    file_suffixes: ClassVar[tuple[str, ...]]
    backends: ClassVar[list[type["Tokenizer"]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Tokenizer.backends.append(cls)

    def __init__(self, vocab_size: int, special_ids: dict[str, int]) -> None:
        self.vocab_size = vocab_size
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.pad_id: int | None = None
        self.unk_id: int | None = None
        self.add_bos = False
        self.chat_template: str | None = None
        self.eog_ids: frozenset[int] = frozenset()
        # pieces that encode(special=True) maps to their single ids
        self._special_ids = dict(special_ids)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read tokenizer.model, tokenizer.json, a .gguf's vocabulary, or whichever of them a folder holds."""
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (path / name).is_file():
                    return cls.load(path / name)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.load(ggufs[0])
            raise FileNotFoundError(
                f"{path}: no tokenizer.model or tokenizer.json, and "
                + (f"{len(ggufs)} .gguf files (need exactly one)" if ggufs else "no .gguf file")
            )
        if not path.is_file():
            raise FileNotFoundError(path)
        if path.suffix == ".gguf":
            # parse is ~40x faster than gguf.GGUFReader on a 50k-token vocabulary
            return cls.from_gguf({k: v for k, v in parse(path)[1].items() if k.startswith("tokenizer.")})
        # any other file is tried as a SentencePiece model, the Llama 2 format
        backend = next((b for b in Tokenizer.backends if path.suffix in b.file_suffixes),
                       next(b for b in Tokenizer.backends if b.kind == "sentencepiece"))
        return backend.from_file(path)

    @classmethod
    def from_gguf(cls, kv: dict) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF's ``tokenizer.*`` metadata describes, with llama.cpp's semantics."""
        model = kv.get("tokenizer.ggml.model")
        tokens = as_list(kv.get("tokenizer.ggml.tokens"))
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        tokens = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in tokens]
        types = [int(t) for t in as_list(kv.get("tokenizer.ggml.token_type"))] or [TokenType.NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
        backend = next((b for b in Tokenizer.backends if b.gguf_model == model), None)
        if backend is None:
            known = ", ".join(repr(b.gguf_model) for b in Tokenizer.backends)
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: {known})")
        self = backend.from_gguf_vocab(kv, tokens, types)
        self.chat_template = pick_chat_template(kv.get("tokenizer.chat_template"))
        return self._finish()

    @classmethod
    @abstractmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        """The backend's own file format (with tokenizer_config.json next to it)."""

    @classmethod
    @abstractmethod
    def from_gguf_vocab(cls, kv: dict, tokens: list[str], types: list[int]) -> "Tokenizer":
        """The backend built from GGUF metadata, special ids and add_bos set (called by from_gguf)."""

    def _finish(self) -> "Tokenizer":
        for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < self.vocab_size:
                setattr(self, name, None)
        eog = {self.eos_id} if self.eos_id is not None else set()
        for text in EOG_TOKEN_TEXTS:
            i = self.piece_to_id(text)
            if i is not None:
                eog.add(i)
        self.eog_ids = frozenset(eog)
        return self

    def _apply_hf_config(self, cfg: dict) -> None:
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id"), ("unk_token", "unk_id")):
            if key in cfg:
                text = token_content(cfg[key])
                setattr(self, attr, self.piece_to_id(text) if text is not None else None)
        if "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"])
        template = pick_chat_template(cfg.get("chat_template"))
        if template:
            self.chat_template = template

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; special=True turns control-token texts into their ids (llama.cpp's parse_special)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._encode(text, special)
        if bos:
            if self.bos_id is None:
                raise ValueError("bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError("eos=True but this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of token ids; skip_special=False writes control tokens out as their text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._decode([int(i) for i in ids], skip_special)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of an id (IndexError outside the vocabulary)."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return self._piece(i)

    def is_control(self, i: int) -> bool:
        """Whether id ``i`` is a control (special) token; False outside the vocabulary."""
        i = int(i)
        return 0 <= i < self.vocab_size and self._is_control(i)

    def special_pieces(self) -> list[str]:
        """The token texts that encode(special=True) turns into single control/unknown ids."""
        return sorted(self._special_ids)

    @abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocab entry spelled exactly `piece`, or None."""

    @abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int], skip_special: bool) -> str: ...

    @abstractmethod
    def _piece(self, i: int) -> str: ...

    @abstractmethod
    def _is_control(self, i: int) -> bool: ...

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")

    # ------------------------------------------------------------------ export

    def save(self, directory) -> None:
        """Write the backend's file and a tokenizer_config.json that transformers reads the same way."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self._token_text(self.bos_id),
            "eos_token": self._token_text(self.eos_id),
            "unk_token": self._token_text(self.unk_id),
            "pad_token": self._token_text(self.pad_id),
            "clean_up_tokenization_spaces": False,
        }
        cfg.update(self._save_model(directory))
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        atomic_write_json(directory / "tokenizer_config.json", cfg)

    @abstractmethod
    def _save_model(self, directory: Path) -> dict[str, Any]:
        """Write the model file; return the tokenizer_config.json keys that name its class."""

    def _token_text(self, i: int | None) -> str | None:
        return None if i is None else self.id_to_piece(i)
