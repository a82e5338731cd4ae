"""Tokenizers: SentencePiece (Llama 2) and byte-level BPE, loaded from tokenizer.model, tokenizer.json,
a checkpoint folder or GGUF metadata, with Meta's BOS/EOS rules and llama.cpp's GGUF semantics.

The algorithms are the `sentencepiece` and `tokenizers` libraries'; this module only rebuilds their models
from GGUF metadata and writes them back.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import sentencepiece as spm
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

__all__ = ["Tokenizer", "TokenType", "EOG_TOKEN_TEXTS"]


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
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
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


def _canonical_pre(pre: str | None) -> str:
    if pre is None:
        return "default"
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in _PRE_SPLITS:
        warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}; using llama.cpp's 'default' pre-tokenizer", stacklevel=3)
        return "default"
    return pre


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    stages = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
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
    for name, regexes in _PRE_SPLITS.items():
        if tuple(regexes) == stages:
            return name
    return None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": ..., "template": ...}] as transformers allows
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _read_hf_config(directory: Path) -> dict:
    """tokenizer_config.json (+ chat_template.jinja, special_tokens_map.json) of a checkpoint folder."""
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = directory / name
        if p.is_file():
            cfg.update(json.loads(p.read_text(encoding="utf-8")))
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    return cfg


def _as_list(value) -> list:
    if value is None:
        return []
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _read_gguf_kv(path: Path) -> dict:
    from .formats.gguf import parse  # ~40x faster than gguf.GGUFReader on a 50k-token vocabulary
    return {k: v for k, v in parse(path)[1].items() if k.startswith("tokenizer.")}


class Tokenizer:
    """One tokenizer API over a SentencePiece processor ("sentencepiece") or a `tokenizers` model ("bpe")."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None

    def __init__(self) -> None:
        raise TypeError("use Tokenizer.load(path) or Tokenizer.from_gguf(kv)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def _new(cls, kind: str) -> "Tokenizer":
        self = object.__new__(cls)
        self.kind = kind
        self.chat_template = None
        self.bos_id = self.eos_id = self.pad_id = self.unk_id = None
        self.add_bos = False
        self._sp = None
        self._proto = None
        self._tk = None
        self._tk_plain = None
        self._pre = None
        self._special_re = None
        self._special_ids: dict[str, int] = {}
        return self

    @classmethod
    def _from_sp_proto(cls, proto) -> "Tokenizer":
        self = cls._new("sentencepiece")
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size = self._sp.get_piece_size()
        # Control and unknown pieces are never matched in text by sentencepiece; encode(special=True)
        # splits them out first, like llama.cpp's parse_special.
        self._special_ids = {
            p.piece: i for i, p in enumerate(proto.pieces) if p.type in (TokenType.CONTROL, TokenType.UNKNOWN)
        }
        return self

    @classmethod
    def _from_tk(cls, tk: tokenizers.Tokenizer) -> "Tokenizer":
        self = cls._new("bpe")
        self._tk = tk
        plain = tokenizers.Tokenizer.from_str(tk.to_str())
        plain.encode_special_tokens = True  # special tokens stay plain text unless special=True
        self._tk_plain = plain
        ids = tk.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(ids) + 1 if ids else 0
        self._special_ids = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        try:
            self._pre = _detect_pre(json.loads(tk.to_str()))
        except (ValueError, KeyError):
            self._pre = None
        return self

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
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(self._special_ids, key=len, reverse=True)))
            if self.kind == "sentencepiece" and self._special_ids
            else None
        )
        return self

    @classmethod
    def load(cls, path) -> "Tokenizer":
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
            return cls.from_gguf(_read_gguf_kv(path))
        if path.suffix == ".json":
            return cls._load_tokenizer_json(path)
        return cls._load_sentencepiece(path)

    @classmethod
    def _load_sentencepiece(cls, path: Path) -> "Tokenizer":
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception as e:  # protobuf raises DecodeError, which is not exported consistently
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
        if not proto.pieces:
            raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
        self = cls._from_sp_proto(proto)
        sp = self._sp
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            (i if i >= 0 else None) for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        )
        self.add_bos = True  # Meta's Llama 2 convention
        self._apply_hf_config(_read_hf_config(path.parent))
        return self._finish()

    @classmethod
    def _load_tokenizer_json(cls, path: Path) -> "Tokenizer":
        tk = tokenizers.Tokenizer.from_file(str(path))
        self = cls._from_tk(tk)
        vocab = tk.get_vocab(with_added_tokens=True)
        self.bos_id = next((vocab[t] for t in _BOS_GUESSES if t in vocab), None)
        self.eos_id = next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)
        model = json.loads(tk.to_str()).get("model", {})
        unk = model.get("unk_token")
        self.unk_id = vocab.get(unk) if isinstance(unk, str) else None
        cfg = _read_hf_config(path.parent)
        self._apply_hf_config(cfg)
        if "add_bos_token" not in cfg and self.bos_id is not None:
            # No config: the post-processor tells whether BOS is added.
            with_special = tk.encode("a", add_special_tokens=True).ids
            self.add_bos = bool(with_special) and with_special[0] == self.bos_id
        return self._finish()

    def _apply_hf_config(self, cfg: dict) -> None:
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id"), ("unk_token", "unk_id")):
            if key in cfg:
                text = _token_content(cfg[key])
                setattr(self, attr, self.piece_to_id(text) if text is not None else None)
        if "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"])
        template = _pick_chat_template(cfg.get("chat_template"))
        if template:
            self.chat_template = template

    @classmethod
    def from_gguf(cls, kv: dict) -> "Tokenizer":
        model = kv.get("tokenizer.ggml.model")
        tokens = _as_list(kv.get("tokenizer.ggml.tokens"))
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        tokens = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in tokens]
        types = [int(t) for t in _as_list(kv.get("tokenizer.ggml.token_type"))] or [TokenType.NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")

        def opt_id(key: str, default: int | None) -> int | None:
            v = kv.get(key, default)
            return None if v is None else int(v)

        if model == "llama":
            self = cls._from_sp_proto(cls._sp_proto_from_gguf(kv, tokens, types))
            self.bos_id = opt_id("tokenizer.ggml.bos_token_id", 1)
            self.eos_id = opt_id("tokenizer.ggml.eos_token_id", 2)
            self.unk_id = opt_id("tokenizer.ggml.unknown_token_id", 0)
            self.pad_id = opt_id("tokenizer.ggml.padding_token_id", None)
            add_bos_default = True
        elif model == "gpt2":
            pre = _canonical_pre(kv.get("tokenizer.ggml.pre"))
            self = cls._from_tk(cls._bpe_from_gguf(kv, tokens, types, pre))
            self._pre = pre
            self.bos_id = opt_id("tokenizer.ggml.bos_token_id", None)
            self.eos_id = opt_id("tokenizer.ggml.eos_token_id", None)
            self.unk_id = opt_id("tokenizer.ggml.unknown_token_id", None)
            self.pad_id = opt_id("tokenizer.ggml.padding_token_id", None)
            add_bos_default = pre in _ADD_BOS_DEFAULT
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: 'llama', 'gpt2')")
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", add_bos_default))
        self.chat_template = _pick_chat_template(kv.get("tokenizer.chat_template"))
        return self._finish()

    @staticmethod
    def _sp_proto_from_gguf(kv: dict, tokens: list[str], types: list[int]):
        from sentencepiece import sentencepiece_model_pb2 as pb

        scores = _as_list(kv.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(scores)} scores")
        types = list(types)
        unk = kv.get("tokenizer.ggml.unknown_token_id", 0)
        if TokenType.UNKNOWN not in types and 0 <= unk < len(types):
            types[unk] = TokenType.UNKNOWN  # sentencepiece needs exactly one unknown piece
        proto = pb.ModelProto()
        for piece, score, typ in zip(tokens, scores, types):
            p = proto.pieces.add()
            p.piece, p.score = piece, float(score)
            # llama.cpp treats an undefined type as normal text.
            p.type = typ if typ in (1, 2, 3, 4, 5, 6) else TokenType.NORMAL
        ts = proto.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size = len(tokens)
        ts.byte_fallback = TokenType.BYTE in types
        for field, key, default in (("unk", "unknown_token_id", 0), ("bos", "bos_token_id", 1),
                                    ("eos", "eos_token_id", 2), ("pad", "padding_token_id", -1)):
            i = kv.get(f"tokenizer.ggml.{key}", default)
            i = int(i) if i is not None and 0 <= int(i) < len(tokens) else -1
            setattr(ts, f"{field}_id", i)
            if i >= 0:
                setattr(ts, f"{field}_piece", tokens[i])
        ns = proto.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
        ns.remove_extra_whitespaces = bool(kv.get("tokenizer.ggml.remove_extra_whitespaces", False))
        ns.escape_whitespaces = True
        return proto

    @staticmethod
    def _bpe_from_gguf(kv: dict, tokens: list[str], types: list[int], pre: str) -> tokenizers.Tokenizer:
        merges_raw = _as_list(kv.get("tokenizer.ggml.merges"))
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

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            if special and self._special_re is not None:
                ids: list[int] = []
                pos = 0
                for m in self._special_re.finditer(text):
                    if m.start() > pos:
                        ids.extend(self._sp.encode(text[pos:m.start()]))
                    ids.append(self._special_ids[m.group()])
                    pos = m.end()
                if pos < len(text):
                    ids.extend(self._sp.encode(text[pos:]))
            else:
                ids = list(self._sp.encode(text))
        else:
            ids = list((self._tk if special else self._tk_plain).encode(text, add_special_tokens=False).ids)
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
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self._tk.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            return self._sp.decode(ids)
        # Surfaces keep sentencepiece's own whitespace and byte-fallback handling; control pieces,
        # which decode to nothing, are written out as their text.
        try:
            proto = self._sp.decode(ids, return_type="proto")
        except TypeError:  # sentencepiece < 0.2.1
            proto = self._sp.decode(ids, out_type="immutable_proto")
        return "".join(p.piece if self._sp.is_control(p.id) else p.surface for p in proto.pieces)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        if self.kind == "sentencepiece":
            return self._sp.id_to_piece(i)
        piece = self._tk.id_to_token(i)
        if piece is None:
            raise IndexError(f"token id {i} has no piece")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocab entry spelled exactly `piece`, or None."""
        if piece is None:
            return None
        if self.kind == "sentencepiece":
            i = self._sp.piece_to_id(piece)
            return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to unk_id
        return self._tk.token_to_id(piece)

    def special_pieces(self) -> list[str]:
        """The token texts that encode(special=True) turns into single control/unknown ids."""
        return sorted(self._special_ids)

    def is_control(self, i: int) -> bool:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            return False
        if self.kind == "sentencepiece":
            return bool(self._sp.is_control(i))
        return self._tk.id_to_token(i) in self._special_ids

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sp"] = None
        state["_special_re"] = None
        for k in ("_tk", "_tk_plain"):
            state[k] = state[k].to_str() if state[k] is not None else None
        state["_proto"] = state["_proto"].SerializeToString() if state["_proto"] is not None else None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._proto is not None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self._proto)
            self._proto = proto
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto.SerializeToString())
        if self._tk is not None:
            self._tk = tokenizers.Tokenizer.from_str(self._tk)
            self._tk_plain = tokenizers.Tokenizer.from_str(self._tk_plain)
            self._tk_plain.encode_special_tokens = True
        if self.kind == "sentencepiece" and self._special_ids:
            self._special_re = re.compile(
                "|".join(re.escape(t) for t in sorted(self._special_ids, key=len, reverse=True)))

    # ------------------------------------------------------------------ export

    def _token_text(self, i: int | None) -> str | None:
        return None if i is None else self.id_to_piece(i)

    def save(self, directory) -> None:
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
        if self.kind == "sentencepiece":
            (directory / "tokenizer.model").write_bytes(self._proto.SerializeToString())
            cfg.update(tokenizer_class="LlamaTokenizer", legacy=True)
        else:
            self._tk.save(str(directory / "tokenizer.json"))
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")

    def gguf_kv(self) -> dict:
        kv: dict[str, Any] = {}
        if self.kind == "sentencepiece":
            kv["tokenizer.ggml.model"] = "llama"
            kv["tokenizer.ggml.pre"] = "default"
            kv["tokenizer.ggml.tokens"] = [p.piece for p in self._proto.pieces]
            kv["tokenizer.ggml.scores"] = [float(p.score) for p in self._proto.pieces]
            kv["tokenizer.ggml.token_type"] = [int(p.type) for p in self._proto.pieces]
            kv["tokenizer.ggml.add_space_prefix"] = bool(self._proto.normalizer_spec.add_dummy_prefix)
            if self._proto.normalizer_spec.remove_extra_whitespaces:
                kv["tokenizer.ggml.remove_extra_whitespaces"] = True
        else:
            tk_json = json.loads(self._tk.to_str())
            model = tk_json.get("model", {})
            if model.get("type") != "BPE" or self._pre is None:
                raise ValueError(
                    "only byte-level BPE tokenizers with a pre-tokenizer llama.cpp knows "
                    f"({', '.join(_PRE_SPLITS)}) can be written as a GGUF gpt2 vocab; "
                    "for a SentencePiece model save its tokenizer.model instead")
            added = self._tk.get_added_tokens_decoder()
            tokens, types = [], []
            for i in range(self.vocab_size):
                t = self._tk.id_to_token(i)
                if t is None:  # llama.cpp needs a dense vocab
                    tokens.append(f"[PAD{i}]")
                    types.append(TokenType.UNUSED)
                    continue
                tokens.append(t)
                if i in added:
                    types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
                else:
                    types.append(TokenType.NORMAL)
            kv["tokenizer.ggml.model"] = "gpt2"
            kv["tokenizer.ggml.pre"] = self._pre
            kv["tokenizer.ggml.tokens"] = tokens
            kv["tokenizer.ggml.token_type"] = types
            kv["tokenizer.ggml.merges"] = [m if isinstance(m, str) else f"{m[0]} {m[1]}"
                                           for m in model.get("merges", [])]
            kv["tokenizer.ggml.add_space_prefix"] = False
        for key, i in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                       ("unknown_token_id", self.unk_id), ("padding_token_id", self.pad_id)):
            if i is not None:
                kv[f"tokenizer.ggml.{key}"] = int(i)
        kv["tokenizer.ggml.add_bos_token"] = bool(self.add_bos)
        kv["tokenizer.ggml.add_eos_token"] = False
        return kv

    def write_gguf(self, writer) -> None:
        """Add gguf_kv() (and the chat template, if any) to a `gguf.GGUFWriter` with the types llama.cpp expects."""
        kv = self.gguf_kv()
        writer.add_tokenizer_model(kv["tokenizer.ggml.model"])
        writer.add_tokenizer_pre(kv["tokenizer.ggml.pre"])
        writer.add_token_list(kv["tokenizer.ggml.tokens"])
        if "tokenizer.ggml.scores" in kv:
            writer.add_token_scores(kv["tokenizer.ggml.scores"])
        writer.add_token_types(kv["tokenizer.ggml.token_type"])
        if "tokenizer.ggml.merges" in kv:
            writer.add_token_merges(kv["tokenizer.ggml.merges"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
            if f"tokenizer.ggml.{key}" in kv:
                add(kv[f"tokenizer.ggml.{key}"])
        writer.add_add_bos_token(kv["tokenizer.ggml.add_bos_token"])
        writer.add_add_eos_token(kv["tokenizer.ggml.add_eos_token"])
        writer.add_add_space_prefix(kv["tokenizer.ggml.add_space_prefix"])
        if kv.get("tokenizer.ggml.remove_extra_whitespaces"):
            writer.add_remove_extra_whitespaces(True)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)
