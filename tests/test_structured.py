"""Structured output by constrained decoding (llguidance), checked with the `jsonschema` validator.

A random-weight tiny model writes nothing sensible on its own, so every valid JSON document it
produces under a grammar is the grammar's doing. The tokenizer is a SentencePiece model trained
here with byte fallback (Llama 2's kind); the BPE path is covered with SmolLM2 in test_server.py.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from conftest import TINY_TEXT  # noqa: E402
from llamaforge.generate import Batch  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402
from llamaforge.server.structured import Constrainer, StructuredOutputError, grammar_for  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    tok_mod = pytest.importorskip("llamaforge.tokenizer")
    path = tmp_path_factory.mktemp("spjson") / "tokenizer.model"
    text = TINY_TEXT + ['{"ok": true, "n": 12, "tag": "red"}', "[1, 2, 3] {} null false"] * 20
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=f, vocab_size=VOCAB,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                       minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return tok_mod.Tokenizer.load(path)


@pytest.fixture(scope="module")
def model():
    from llamaforge.config import PRESETS
    from llamaforge.model import Transformer
    return Transformer(PRESETS["tiny"].replace(vocab_size=VOCAB)).init_weights(0).eval()


def test_grammar_for_response_formats():
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None
    assert grammar_for({"type": "json_object"})
    assert grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "json"):
        with pytest.raises(StructuredOutputError):
            grammar_for(bad)


def test_random_model_writes_schema_valid_json_under_the_grammar(model, tokenizer):
    constrainer = Constrainer(tokenizer, VOCAB)
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    prompt = tokenizer.encode("the quick brown fox", bos=True)
    batch = Batch(model, tokenizer, max_batch=4, max_seq=256)
    seqs = []
    for seed in range(4):   # sampled, so each sequence takes its own path through the grammar
        s = batch.add(prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=seed))
        s.logits_processor = constrainer.processor(grammar)
        seqs.append(s)
    while any(not s.finish_reason for s in seqs):
        batch.step()
    docs = [json.loads(s.stream.text) for s in seqs]
    assert all(s.finish_reason == "stop" for s in seqs)
    for d in docs:
        jsonschema.validate(d, SCHEMA)


def test_processor_is_per_sequence(model, tokenizer):
    """In one batch, a constrained sequence gets JSON while its unconstrained neighbour is untouched."""
    constrainer = Constrainer(tokenizer, VOCAB)
    prompt = tokenizer.encode("hello world", bos=True)
    params = SamplingParams(max_tokens=12)
    alone = Batch(model, tokenizer, max_batch=1, max_seq=128)
    ref = alone.add(prompt, params)
    while not ref.finish_reason:
        alone.step()
    batch = Batch(model, tokenizer, max_batch=2, max_seq=128)
    free = batch.add(prompt, params)
    tied = batch.add(prompt, SamplingParams(max_tokens=40))
    tied.logits_processor = constrainer.processor(grammar_for({"type": "json_object"}))
    while not (free.finish_reason and tied.finish_reason):
        batch.step()
    assert free.out == ref.out
    assert tied.stream.text.startswith("{") and tied.out != free.out
    if tied.finish_reason == "stop":
        assert isinstance(json.loads(tied.stream.text), dict)


def test_forced_tokens_skip_decode_steps(model, tokenizer):
    """Jump-forward: text the grammar allows alone is appended without a decode step per token (its
    keys are computed in one forward before the next step), and what follows is what plain
    decoding gives, so those keys sit at the right positions."""
    from llamaforge.server.structured import lark_grammar
    constrainer = Constrainer(tokenizer, VOCAB)
    grammar = lark_grammar('start: "the quick brown fox jumps over the lazy dog" /[0-9]{3,8}/', "test grammar")
    prompt = tokenizer.encode("hello world", bos=True)

    class Plain:                      # the same processor without `forced`: one token per step
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, out, logits):
            return self.inner(out, logits)

    runs = {}
    for name, wrap in (("jump", lambda p: p), ("plain", Plain)):
        batch = Batch(model, tokenizer, max_batch=1, max_seq=128)
        s = batch.add(prompt, SamplingParams(max_tokens=40, temperature=0.0))
        s.logits_processor = wrap(constrainer.processor(grammar))
        steps = 0
        while not s.finish_reason:
            batch.step()
            steps += 1
        runs[name] = (s.out, s.stream.text, steps)
    (jump, text, jump_steps), (plain, _, plain_steps) = runs["jump"], runs["plain"]
    assert text.startswith("the quick brown fox jumps over the lazy dog") and text[-3:].isdigit()
    assert jump == plain
    assert plain_steps >= len(plain) and jump_steps <= plain_steps - 5
