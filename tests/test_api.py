"""The Python API on the real bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
import pytest
import torch

from llamaforge import Llama
from llamaforge.generate import ContextOverflow

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def llm():
    return Llama.load()


def test_default_model_loads_with_its_own_config(llm):
    a = llm.args
    assert (a.n_layers, a.dim, a.n_heads, a.kv_heads, a.vocab_size) == (30, 576, 9, 3, 49152)
    assert a.rope_theta == 100000.0 and a.tie_embeddings
    assert llm.chat_template and "<|im_start|>" in llm.chat_template


def test_logits_shape_and_dtype(llm):
    ids = llm.tokenizer.encode("The quick brown fox")
    out = llm.logits(ids)
    assert out.dtype == torch.float32 and out.shape == (len(ids), 49152)


def test_chat_answers_sensibly(llm):
    r = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in r.text
    assert r.finish_reason in ("stop", "length") and r.prompt_tokens > 5 and r.tokens


def test_streaming_equals_blocking(llm):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]
    whole = llm.chat(msgs, max_tokens=20)
    pieces = list(llm.chat(msgs, max_tokens=20, stream=True))
    assert "".join(pieces) == whole.text and len(pieces) > 1


def test_completion_tokens_decode_to_text(llm):
    r = llm.complete("The capital of France is", max_tokens=8)
    assert r.finish_reason == "length" and len(r.tokens) == 8
    assert llm.tokenizer.decode(r.tokens).strip() == r.text.strip()


def test_stop_string_truncates_and_reports_stop(llm):
    full = llm.complete("1, 2, 3, 4,", max_tokens=12).text
    assert " 6" in full  # the model counts on
    r = llm.complete("1, 2, 3, 4,", max_tokens=12, stop=[" 6"])
    assert r.finish_reason == "stop" and r.text == full[: full.index(" 6")]


def test_echo_prepends_the_prompt(llm):
    r = llm.complete("Hello there", max_tokens=3, echo=True)
    assert r.text.startswith("Hello there")


def test_logprobs_are_per_token_and_match_logits(llm):
    prompt = "The capital of France is"
    r = llm.complete(prompt, max_tokens=4, logprobs=True)
    assert len(r.logprobs) == len(r.tokens) == 4
    ids = llm.encode_prompt(prompt) + r.tokens
    lp = torch.log_softmax(llm.logits(ids), -1)
    n = len(ids) - 4
    for i, t in enumerate(r.tokens):
        assert r.logprobs[i] == pytest.approx(float(lp[n - 1 + i, t]), abs=2e-3)


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    assert llm.complete("Once upon a time", **kw).text == llm.complete("Once upon a time", **kw).text


def test_batch_equals_single(llm):
    prompts = ["The capital of Italy is", "2 + 2 =", "def fibonacci(n):"]
    batch = llm.complete_batch(prompts, max_tokens=10)
    for p, b in zip(prompts, batch):
        assert b.text == llm.complete(p, max_tokens=10).text


def test_prompt_longer_than_context_is_a_clear_error():
    small = Llama.load(max_seq_len=64)
    with pytest.raises(ContextOverflow, match="context window is 64"):
        small.complete("word " * 200, max_tokens=4)


@pytest.fixture
def tiny_q8(make_checkpoint, tiny_tokenizer):
    path, _ = make_checkpoint("gguf", tokenizer=tiny_tokenizer, qtype="q8_0")
    return path


def _wq(llm):
    return llm.model.layers[0].attention.wq


def test_weights_and_quantize_options(tiny_q8):
    """weights= picks blocks or float; quantize= repacks float weights; the old spellings warn and mean the same."""
    from torch import nn

    from llamaforge.quant import Int8Linear

    ids = list(range(1, 9))
    blocks = Llama.load(tiny_q8)
    flt = Llama.load(tiny_q8, weights="float")
    assert not isinstance(_wq(blocks), nn.Linear)              # computes from the GGUF's blocks
    assert isinstance(_wq(flt), nn.Linear) and _wq(flt).weight.dtype == torch.float32
    torch.testing.assert_close(blocks.logits(ids), flt.logits(ids), atol=2e-3, rtol=0)
    with pytest.warns(DeprecationWarning, match="weights='float'"):
        old_float = Llama.load(tiny_q8, quantize=None)
    assert isinstance(_wq(old_float), nn.Linear)
    torch.testing.assert_close(old_float.logits(ids), flt.logits(ids))
    with pytest.warns(DeprecationWarning, match="weights='blocks'"):
        old_auto = Llama.load(tiny_q8, quantize="auto")
    torch.testing.assert_close(old_auto.logits(ids), blocks.logits(ids))
    assert isinstance(_wq(Llama.load(tiny_q8, quantize="int8")), Int8Linear)


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": "blocks", "quantize": "int8"}, "quantize repacks float weights"),
    ({"weights": "packed"}, "weights must be one of blocks, float"),
    ({"quantize": "int3"}, "quantize must be None, int8 or int4"),
    ({"dtype": "float64"}, "dtype 'float64' is not one of float32, bfloat16, float16"),
])
def test_bad_load_options_are_clear_errors(tiny_q8, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Llama.load(tiny_q8, **kwargs)
