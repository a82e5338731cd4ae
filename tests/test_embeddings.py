"""`Llama.embed`: the batching rules (right padding under causal attention changes nothing; chunks
follow the token budget) and bad inputs. The vectors themselves are checked against transformers'
LlamaModel in test_bundled_vs_transformers.py (which loads that model once for all its checks)."""
from __future__ import annotations

import pytest
import torch

from llamaforge.embedding import plan

TEXTS = ["Hello world", "The cat sat on the mat.", "Embeddings map a text to a vector.",
         "A much longer sentence about the weather in Paris, which was rainy and cold all week long."]


@pytest.fixture(scope="module")
def llm(bundled_gguf):
    from llamaforge import Llama
    return Llama.load(bundled_gguf)


def test_plan_groups_longest_first_within_the_budget():
    assert plan([3, 10, 5, 10], 20) == [[1, 3], [2, 0]]
    assert plan([50, 4], 16) == [[0], [1]]           # an input over the budget runs alone, whole
    assert sorted(i for c in plan(list(range(1, 40)), 64) for i in c) == list(range(39))


def test_padding_and_batching_do_not_change_an_embedding(llm):
    together = llm.embed(TEXTS)                       # one forward, rows padded to the longest
    alone = torch.cat([llm.embed(t) for t in TEXTS])
    assert together.shape == (len(TEXTS), llm.args.dim)
    assert torch.allclose(together.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (together - alone).abs().max() < 1e-5      # float32 rounding of different matmul shapes only
    ids = llm.embedding_ids(TEXTS)
    assert torch.equal(llm.embed(ids), together)      # token ids in, the same vectors out
    assert torch.allclose(llm.embed(TEXTS, budget=1), together, atol=1e-5)   # one input per forward


@pytest.mark.parametrize("bad", ["", [], [[]], [[1, 2], [10 ** 9]]])
def test_bad_inputs_are_value_errors(llm, bad):
    with pytest.raises(ValueError):
        llm.embed(bad)


def test_too_long_is_a_context_overflow(llm):
    from llamaforge.generate import ContextOverflow
    with pytest.raises(ContextOverflow):
        llm.embed([[1] * (llm.args.max_seq_len + 1)])


def test_int8_activations_stay_close_to_the_default(llm):
    """activations="int8" (llama.cpp's arithmetic for block matmuls) moves the vectors by quantization
    noise only; the shortest inputs move most (0.9990 seen for a 7-token one)."""
    cos = (llm.embed(TEXTS, activations="int8") * llm.embed(TEXTS)).sum(-1)
    assert float(cos.min()) >= 0.998, cos
