"""Generation on a tiny random model: the cached, batched path against plain full-sequence forwards."""
import pytest
import torch

from llamaforge.config import PRESETS
from llamaforge.generate import Batch, ContextOverflow, TextStream, generate, generate_batch
from llamaforge.model import Transformer
from llamaforge.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny"]).init_weights(seed=0).eval()


def greedy_reference(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence every step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_full_recompute(model):
    prompt = [5, 17, 99, 3, 250, 8]
    out = [ev.id for ev in generate(model, prompt, SamplingParams(max_tokens=20))]
    assert out == greedy_reference(model, prompt, 20)


def test_long_prompt_prefilled_in_chunks(model):
    prompt = list(range(1, 90))
    batch = Batch(model, max_batch=1, max_seq=120, prefill_chunk=16)
    seq = batch.add(prompt, SamplingParams(max_tokens=8))
    while not seq.finish_reason:
        batch.step()
    assert seq.out == greedy_reference(model, prompt, 8)


def test_batch_of_different_lengths_equals_single_runs(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], [100, 101, 102, 103, 104]]
    seqs = generate_batch(model, prompts, SamplingParams(max_tokens=12))
    for p, s in zip(prompts, seqs):
        assert s.out == greedy_reference(model, p, 12)
        assert s.finish_reason == "length"


def test_sequence_joining_mid_flight_matches_its_single_run(model):
    batch = Batch(model, max_batch=3, max_seq=64)
    a = batch.add([1, 2, 3, 4], SamplingParams(max_tokens=10))
    for _ in range(4):
        batch.step()
    b = batch.add([7, 7, 7], SamplingParams(max_tokens=10))
    while not (a.finish_reason and b.finish_reason):
        batch.step()
    assert a.out == greedy_reference(model, [1, 2, 3, 4], 10)
    assert b.out == greedy_reference(model, [7, 7, 7], 10)
    batch.release(a)
    c = batch.add([5, 6], SamplingParams(max_tokens=5))   # reuses a's slot; stale keys must be masked
    while not c.finish_reason:
        batch.step()
    assert c.out == greedy_reference(model, [5, 6], 5)


def test_logprobs_match_full_forward(model):
    prompt = [3, 1, 4, 1, 5]
    evs = list(generate(model, prompt, SamplingParams(max_tokens=6, logprobs=True)))
    ids = prompt + [e.id for e in evs]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    for i, e in enumerate(evs):
        assert e.logprob == pytest.approx(float(lp[len(prompt) - 1 + i, e.id]), abs=1e-4)


def test_stop_ids_end_generation(model):
    prompt = [5, 17, 99]
    ref = greedy_reference(model, prompt, 10)
    stop = ref[4]
    evs = list(generate(model, prompt, SamplingParams(max_tokens=10), stop_ids=[stop]))
    assert evs[-1].finish_reason == "stop"
    assert [e.id for e in evs][:-1] == ref[: ref.index(stop)]


def test_seeded_sampling_reproducible(model):
    p = SamplingParams(max_tokens=15, temperature=1.0, top_k=50, seed=123)
    a = [e.id for e in generate(model, [1, 2, 3], p)]
    b = [e.id for e in generate(model, [1, 2, 3], p)]
    assert a == b


def test_prompt_longer_than_context_is_a_clear_error(model):
    n = model.args.max_seq_len
    with pytest.raises(ContextOverflow, match=f"{n}"):
        list(generate(model, [1] * n, SamplingParams(max_tokens=4)))


def test_generation_stops_at_the_context_end(model):
    n = model.args.max_seq_len
    evs = list(generate(model, [1] * (n - 3), SamplingParams(max_tokens=50)))
    assert len(evs) == 3 and evs[-1].finish_reason == "length"


class CharTokenizer:
    """One id per character: enough to test stop-string and streaming logic in isolation."""
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_possible_stop_prefix_and_truncates():
    ts = TextStream(CharTokenizer(), stop=("END",))
    out = "".join(ts.push(ord(c)) for c in "hello E")
    assert out == "hello "            # the 'E' may start 'END'
    out += "".join(ts.push(ord(c)) for c in "Nx")
    assert out == "hello ENx" and not ts.stopped
    out += "".join(ts.push(ord(c)) for c in " bye END more")
    assert ts.stopped and out == "hello ENx bye "
