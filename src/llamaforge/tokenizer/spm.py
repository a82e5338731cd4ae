"""The SentencePiece backend (Llama 2's tokenizer.model, GGUF ``tokenizer.ggml.model = llama``).

The algorithm is the `sentencepiece` library's; this module rebuilds its model proto from GGUF metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from .base import Tokenizer, TokenType, as_list, gguf_id, read_hf_config, special_pattern


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model proto and its processor."""

    kind = "sentencepiece"
    gguf_model = "llama"
    file_suffixes = (".model",)

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # Control and unknown pieces are never matched in text by sentencepiece; encode(special=True)
        # splits them out first, like llama.cpp's parse_special.
        special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (TokenType.CONTROL, TokenType.UNKNOWN)}
        super().__init__(self._sp.get_piece_size(), special)
        self._special_re = special_pattern(special)

    @classmethod
    def from_file(cls, path: Path) -> "SentencePieceTokenizer":
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception as e:  # protobuf raises DecodeError, which is not exported consistently
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
        if not proto.pieces:
            raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
        self = cls(proto)
        sp = self._sp
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            (i if i >= 0 else None) for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id())
        )
        self.add_bos = True  # Meta's Llama 2 convention
        self._apply_hf_config(read_hf_config(path.parent))
        return self._finish()

    @classmethod
    def from_gguf_vocab(cls, kv: dict, tokens: list[str], types: list[int]) -> "SentencePieceTokenizer":
        self = cls(_proto_from_gguf(kv, tokens, types))
        self.bos_id = gguf_id(kv, "tokenizer.ggml.bos_token_id", 1)
        self.eos_id = gguf_id(kv, "tokenizer.ggml.eos_token_id", 2)
        self.unk_id = gguf_id(kv, "tokenizer.ggml.unknown_token_id", 0)
        self.pad_id = gguf_id(kv, "tokenizer.ggml.padding_token_id", None)
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", True))
        return self

    def _encode(self, text: str, special: bool) -> list[int]:
        if not (special and self._special_re is not None):
            return list(self._sp.encode(text))
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids.extend(self._sp.encode(text[pos:m.start()]))
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._sp.encode(text[pos:]))
        return ids

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self._sp.decode(ids)
        # Surfaces keep sentencepiece's own whitespace and byte-fallback handling; control pieces,
        # which decode to nothing, are written out as their text.
        try:
            proto = self._sp.decode(ids, return_type="proto")
        except TypeError:  # sentencepiece < 0.2.1
            proto = self._sp.decode(ids, out_type="immutable_proto")
        return "".join(p.piece if self._sp.is_control(p.id) else p.surface for p in proto.pieces)

    def _piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        if piece is None:
            return None
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to unk_id

    def _is_control(self, i: int) -> bool:
        return bool(self._sp.is_control(i))

    def _save_model(self, directory: Path) -> dict[str, Any]:
        (directory / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        return {"tokenizer_class": "LlamaTokenizer", "legacy": True}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(proto=self.proto.SerializeToString(), _sp=None, _special_re=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        proto = pb.ModelProto()
        proto.ParseFromString(state["proto"])
        self.proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])
        self._special_re = special_pattern(self._special_ids)


def _proto_from_gguf(kv: dict, tokens: list[str], types: list[int]) -> Any:
    """A SentencePiece BPE model proto holding a GGUF ``llama`` vocabulary."""
    scores = as_list(kv.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
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
