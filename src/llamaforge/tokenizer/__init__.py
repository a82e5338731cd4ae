"""Tokenizers: SentencePiece (Llama 2) and byte-level BPE behind one interface (`Tokenizer`), loaded
from tokenizer.model, tokenizer.json, a checkpoint folder or GGUF metadata, with Meta's BOS/EOS rules
and llama.cpp's GGUF semantics. Writing a vocabulary into a GGUF is `formats.gguf_vocab`'s job.
"""

from __future__ import annotations

from .base import EOG_TOKEN_TEXTS, Tokenizer, TokenType
from .bpe import PRE_TOKENIZERS, BPETokenizer
from .spm import SentencePieceTokenizer

__all__ = ["Tokenizer", "SentencePieceTokenizer", "BPETokenizer", "TokenType", "EOG_TOKEN_TEXTS", "PRE_TOKENIZERS"]
