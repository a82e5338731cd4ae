"""Structured output (`response_format`): valid JSON by constrained decoding with llguidance.

llguidance compiles a JSON Schema into a grammar and, at each step, gives the set of tokens that
keep the output inside it; a per-sequence logits processor masks the rest before sampling. When
the grammar is complete only the end-of-generation tokens remain allowed, so the answer stops.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_SCHEMA_CHARS = 64 * 1024     # a response_format schema, as compact JSON


class StructuredOutputError(ValueError):
    """A response_format that cannot be honoured (bad schema, library missing, unsupported tokenizer)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise StructuredOutputError("structured output needs the llguidance package: "
                                    "pip install 'llamaforge[serve]' (or pip install llguidance)") from e
    return llguidance


def response_schema(response_format: dict[str, Any] | None) -> Any:
    """The JSON schema an OpenAI response_format asks for, or None for plain text."""
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise StructuredOutputError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise StructuredOutputError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return spec.get("schema", {})
    raise StructuredOutputError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for an OpenAI response_format, or None for plain text."""
    schema = response_schema(response_format)
    return None if schema is None else schema_grammar(schema)


def schema_grammar(schema: Any, what: str = "the JSON schema") -> str:
    """The llguidance grammar of a JSON schema (checked: size, syntax, what llguidance supports)."""
    try:
        text = json.dumps(schema)
    except (RecursionError, ValueError, TypeError) as e:
        raise StructuredOutputError(f"{what} cannot be read: {e}") from e
    if len(text) > MAX_SCHEMA_CHARS:
        raise StructuredOutputError(f"{what} has {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    ll = _llguidance()
    try:
        # compact separators: a small model given free whitespace tends to emit newlines forever
        grammar = ll.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    except Exception as e:  # noqa: BLE001 - the library's message names the problem
        raise StructuredOutputError(f"{what} is not a valid JSON schema: {e}") from e
    return check_grammar(grammar, f"{what} is not a valid JSON schema")


def lark_grammar(lark: str, what: str) -> str:
    """An llguidance grammar from Lark text (checked)."""
    try:
        grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    except Exception as e:  # noqa: BLE001 - the library's message names the problem
        raise StructuredOutputError(f"{what} is not valid: {e}") from e
    return check_grammar(grammar, f"{what} is not valid")


def check_grammar(grammar: str, failure: str) -> str:
    """The grammar, if llguidance accepts it; else StructuredOutputError(failure: why)."""
    err = _llguidance().LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise StructuredOutputError(f"{failure}: {err}")
    return grammar


class GrammarProcessor:
    """Per-sequence logits processor: feed the tokens generated so far, mask what the grammar forbids."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0

    def _consume(self, out: list[int]) -> None:
        for t in out[self.consumed:]:
            if not self.matcher.consume_token(t):
                break
        self.consumed = len(out)

    def forced(self, out: list[int]) -> list[int]:
        """The tokens the grammar allows and no other, after out (Batch feeds them without sampling)."""
        self._consume(out)
        m = self.matcher
        if m.is_error() or m.is_stopped():
            return []
        return list(m.compute_ff_tokens())

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        m = self.matcher
        self._consume(out)
        if m.is_error():
            # the matcher cannot say what is valid any more; leave the logits alone rather than stall
            log.warning("grammar matcher error: %s", m.get_error())
            return logits
        allowed = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)
        n = min(allowed.numel(), logits.numel())
        keep = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
        keep[:n] = allowed[:n].to(logits.device) != 0
        return logits.masked_fill(~keep, float("-inf"))


class Constrainer:
    """Makes GrammarProcessors for one tokenizer; the llguidance tokenizer is built once, on first use."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll = None
        self._lock = threading.Lock()

    def processor(self, grammar: str) -> GrammarProcessor:
        ll = _llguidance()
        matcher = ll.LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"cannot use this grammar: {matcher.get_error()}")
        return GrammarProcessor(matcher)

    def _lltokenizer(self):
        with self._lock:
            if self._ll is None:
                self._ll = build_lltokenizer(self.tokenizer, self.vocab_size)
            return self._ll


def build_lltokenizer(tokenizer, vocab_size: int):
    """An llguidance tokenizer for our Tokenizer: from its Hugging Face `tokenizers` object (BPE models)
    or its sentencepiece processor (Llama 2's tokenizer.model)."""
    ll = _llguidance()
    eog = sorted(int(i) for i in (getattr(tokenizer, "eog_ids", None) or [tokenizer.eos_id]))
    hf = _find(tokenizer, "tokenizers", "Tokenizer")
    if hf is not None:
        return ll.LLTokenizer(hf.to_str(), n_vocab=vocab_size, eos_token=eog)
    sp = _find(tokenizer, "sentencepiece", "SentencePieceProcessor")
    if sp is not None:
        return ll.LLTokenizer(ll.TokenizerWrapper(_SentencePieceVocab(sp, tokenizer, eog)), n_vocab=vocab_size,
                              eos_token=eog)
    raise StructuredOutputError(f"structured output does not support this tokenizer ({type(tokenizer).__name__})")


def _find(obj, module: str, cls_name: str):
    """The wrapped library object of a given class inside our Tokenizer (it keeps one as an attribute)."""
    try:
        cls = getattr(__import__(module), cls_name)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, cls):
        return obj
    for v in vars(obj).values():
        if isinstance(v, cls):
            return v
    return None


class _SentencePieceVocab:
    """What llguidance's TokenizerWrapper needs: each token's bytes, special ids, and an encoder."""

    def __init__(self, sp, tokenizer, eog: list[int]):
        self.eos_token_id = eog[0]
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        tokens, special = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):                     # <0x0A> byte-fallback pieces
                tokens.append(bytes([int(piece[3:-1], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                tokens.append(b"\xff" + piece.encode())   # llguidance's marker for special tokens
                special.append(i)
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens = tokens
        self.special_token_ids = special
        self._tok = tokenizer

    # sentencepiece adds a dummy "▁" before the text; llguidance needs the tokens of the bare text,
    # so encode behind a marker that does not merge with what follows and drop the marker's tokens
    _MARK = "<unk>"

    def __call__(self, text: str) -> list[int]:
        n = len(self._tok.encode(self._MARK, bos=False))
        return list(self._tok.encode(self._MARK + text, bos=False))[n:]
