"""A tokenizer as GGUF ``tokenizer.*`` metadata, the way llama.cpp reads it back.

Reading goes the other way in `Tokenizer.from_gguf`; tests check both directions against
sentencepiece, tokenizers and llama.cpp.
"""
from __future__ import annotations

from typing import Any

from ..tokenizer import PRE_TOKENIZERS, BPETokenizer, SentencePieceTokenizer, Tokenizer, TokenType


def vocab_kv(tok: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys describing ``tok`` (no chat template)."""
    kv: dict[str, Any] = {}
    if isinstance(tok, SentencePieceTokenizer):
        pieces = tok.proto.pieces
        kv["tokenizer.ggml.model"] = "llama"
        kv["tokenizer.ggml.pre"] = "default"
        kv["tokenizer.ggml.tokens"] = [p.piece for p in pieces]
        kv["tokenizer.ggml.scores"] = [float(p.score) for p in pieces]
        kv["tokenizer.ggml.token_type"] = [int(p.type) for p in pieces]
        kv["tokenizer.ggml.add_space_prefix"] = bool(tok.proto.normalizer_spec.add_dummy_prefix)
        if tok.proto.normalizer_spec.remove_extra_whitespaces:
            kv["tokenizer.ggml.remove_extra_whitespaces"] = True
    elif isinstance(tok, BPETokenizer):
        kv.update(_bpe_kv(tok))
    else:
        raise TypeError(f"no GGUF vocabulary for a {type(tok).__name__}")
    for key, i in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                   ("unknown_token_id", tok.unk_id), ("padding_token_id", tok.pad_id)):
        if i is not None:
            kv[f"tokenizer.ggml.{key}"] = int(i)
    kv["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    kv["tokenizer.ggml.add_eos_token"] = False
    return kv


def _bpe_kv(tok: BPETokenizer) -> dict[str, Any]:
    model = tok.tokenizer_json().get("model", {})
    if model.get("type") != "BPE" or tok.pre is None:
        raise ValueError(
            "only byte-level BPE tokenizers with a pre-tokenizer llama.cpp knows "
            f"({', '.join(PRE_TOKENIZERS)}) can be written as a GGUF gpt2 vocab; "
            "for a SentencePiece model save its tokenizer.model instead")
    added = tok.added_tokens()
    tokens, types = [], []
    for i in range(tok.vocab_size):
        t = tok.token(i)
        if t is None:  # llama.cpp needs a dense vocab
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(t)
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": tok.pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model.get("merges", [])],
        "tokenizer.ggml.add_space_prefix": False,
    }


def padded_vocab_kv(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """vocab_kv() with the token list padded to the model's vocab_size (llama.cpp sizes the embedding from it)."""
    kv = vocab_kv(tok)
    tokens = list(kv.get("tokenizer.ggml.tokens") or [])
    if len(tokens) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    if tokens and len(tokens) < vocab_size:
        # pad as convert_hf_to_gguf does
        pad = vocab_size - len(tokens)
        kv["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        if kv.get("tokenizer.ggml.scores"):
            kv["tokenizer.ggml.scores"] = list(kv["tokenizer.ggml.scores"]) + [0.0] * pad
        if kv.get("tokenizer.ggml.token_type"):
            kv["tokenizer.ggml.token_type"] = list(kv["tokenizer.ggml.token_type"]) + [TokenType.UNUSED] * pad
    return kv


def write_vocab(writer: Any, tok: Tokenizer) -> None:
    """Add vocab_kv() (and the chat template, if any) to a `gguf.GGUFWriter` with the types llama.cpp expects."""
    kv = vocab_kv(tok)
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
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
