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


def test_common_prefix_lengths():
    from llamaforge.generate import _common_prefix
    assert _common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert _common_prefix([1, 2], [1, 2, 3]) == 2
    assert _common_prefix([5], [1]) == 0
    assert _common_prefix([], [1]) == 0
    a = list(range(1000))
    assert _common_prefix(a, a[:777] + [-1] + a[778:]) == 777


def test_prefix_reuse_gives_the_same_tokens_and_logits(model):
    """A prompt sharing a prefix with a running sequence, then a next turn on a finished one, reuse the
    cached keys/values (copied, or left in place) and decode exactly as without reuse."""
    system = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    prompts = [system + [30, 31, 32], system + [40, 41]]

    def run(reuse: bool):
        batch = Batch(model, max_batch=3, max_seq=96, prefix_reuse=reuse)
        first = batch.add(prompts[0], SamplingParams(max_tokens=6))
        batch.step()
        second = batch.add(prompts[1], SamplingParams(max_tokens=6))   # joins while the first runs
        logits = [second.next_logits.clone()]
        while not (first.finish_reason and second.finish_reason):
            batch.step()
        batch.release(first)
        follow = prompts[0] + first.out + [50, 51, 52]                # the next turn of the first chat
        third = batch.add(follow, SamplingParams(max_tokens=6))
        logits.append(third.next_logits.clone())
        while not third.finish_reason:
            batch.step()
        return [first, second, third], logits

    plain, plain_logits = run(False)
    reused, reused_logits = run(True)
    assert [s.reused for s in plain] == [0, 0, 0]
    assert reused[1].reused == len(system)                         # copied from the running sequence
    # its own slot, left in place: all but the last answer token (sampled, never fed back)
    assert reused[2].reused == len(prompts[0]) + len(reused[0].out) - 1
    assert reused[2].slot == reused[0].slot
    for a, b in zip(plain, reused):
        assert a.out == b.out
    for a, b in zip(plain_logits, reused_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert reused[1].out == greedy_reference(model, prompts[1], 6)


def test_choices_of_one_prompt_share_its_prefill_and_keep_their_own_settings(model):
    """n choices of one prompt: the first is prefilled, the others copy its keys/values and logits
    (no forward of their own), and each row samples with its own seed and penalties exactly as it
    would alone."""
    prompt = [5, 6, 7, 8, 9, 10, 11]
    first = greedy_reference(model, prompt, 1)[0]
    settings = [SamplingParams(max_tokens=8, temperature=0.9, seed=1),
                SamplingParams(max_tokens=8, temperature=0.9, seed=2, frequency_penalty=1.5),
                SamplingParams(max_tokens=8, presence_penalty=2.0, logit_bias={first: -100}),
                SamplingParams(max_tokens=8)]
    batch = Batch(model, max_batch=4, max_seq=32, prefix_reuse=True)
    seqs = [batch.add(prompt, p) for p in settings]
    assert [s.reused for s in seqs] == [0] + [len(prompt)] * 3
    assert all(s.next_logits is seqs[0].next_logits for s in seqs)
    while not all(s.finish_reason for s in seqs):
        batch.step()
    alone = [[ev.id for ev in generate(model, prompt, p)] for p in settings]
    assert [s.out for s in seqs] == alone
    assert alone[3] == greedy_reference(model, prompt, 8) and alone[2][0] != first


def test_greedy_rows_and_processed_rows_share_a_step(model):
    """Plain greedy rows take one batched argmax; a row with a logits processor is sampled on its own."""
    ban = greedy_reference(model, [3, 4, 5], 1)[0]

    def no_first_choice(out, logits):
        return logits.index_fill(0, torch.tensor([ban]), float("-inf"))

    batch = Batch(model, max_batch=3, max_seq=64)
    a = batch.add([1, 2, 3], SamplingParams(max_tokens=5))
    b = batch.add([3, 4, 5], SamplingParams(max_tokens=5))
    b.logits_processor = no_first_choice
    c = batch.add([7, 8], SamplingParams(max_tokens=5))
    while not all(s.finish_reason for s in (a, b, c)):
        batch.step()
    assert a.out == greedy_reference(model, [1, 2, 3], 5)
    assert c.out == greedy_reference(model, [7, 8], 5)
    assert ban not in b.out and len(b.out) == 5


class _Script:
    """A logits processor that makes a sequence write `script` after its first token: with `fast`,
    as a grammar's forced tokens (jump-forward, no decode step each), else by masking the logits
    to the next token of the script at every step."""

    def __init__(self, script: list[int], fast: bool):
        self.script = script
        if fast:
            self.forced = lambda out: self.script[len(out) - 1:] if out else []

    def __call__(self, out, logits):
        i = len(out) - 1
        if 0 <= i < len(self.script):
            keep = torch.full_like(logits, float("-inf"))
            keep[self.script[i]] = 0.0
            return logits + keep
        return logits


def test_forced_tokens_join_the_batched_forward_and_change_nothing(model):
    """Tokens a grammar forces are computed as one-token rows of the next batched forward (next to
    the other sequences' rows): the same tokens, and nearly the same logits, as sampling them one
    decode step at a time; the other sequences' answers are their single-run ones."""
    script = [11, 12, 13, 14, 15]
    runs = {}
    for fast in (True, False):
        batch = Batch(model, max_batch=3, max_seq=64)
        a = batch.add([1, 2, 3, 4], SamplingParams(max_tokens=14))
        s = batch.add([9, 8, 7], SamplingParams(max_tokens=14))
        s.logits_processor = _Script(script, fast)
        b = batch.add([42, 43], SamplingParams(max_tokens=14))
        steps = 0
        while not (a.finish_reason and s.finish_reason and b.finish_reason):
            batch.step()
            steps += 0 if s.finish_reason else 1
        runs[fast] = (a.out, s.out, b.out, steps)
    a_out, s_out, b_out, fast_steps = runs[True]
    assert s_out[1:1 + len(script)] == script
    assert (a_out, s_out, b_out) == runs[False][:3]
    assert fast_steps == runs[False][3] - len(script)   # the script took no decode steps of its own
    assert a_out == greedy_reference(model, [1, 2, 3, 4], 14)
    assert b_out == greedy_reference(model, [42, 43], 14)
    # after the script, the sequence continues as a greedy run of its prompt + first token + script
    assert s_out[1 + len(script):] == greedy_reference(model, [9, 8, 7] + s_out[:1 + len(script)], 14 - 1 - len(script))


def test_step_emits_tokens_before_its_forward(model):
    """A server streams a step's tokens while that step's forward runs, not after it."""
    calls = []

    class Counting:
        def __init__(self, m):
            self.m, self.args, self.rope_cos = m, m.args, m.rope_cos

        def new_cache(self, *a, **k):
            return self.m.new_cache(*a, **k)

        def __call__(self, *a, **k):
            calls.append(1)
            return self.m(*a, **k)

        def hidden(self, *a, **k):     # a decode step's forward (its rows' logits: `output`)
            calls.append(1)
            return self.m.hidden(*a, **k)

        def output(self, h):
            return self.m.output(h)

    batch = Batch(Counting(model), max_batch=1, max_seq=32)
    seq = batch.add([1, 2, 3], SamplingParams(max_tokens=3))
    seen = []
    while not seq.finish_reason:
        before = len(calls)
        batch.step(emit=lambda evs: seen.append((len(calls) == before, [e.id for _, e in evs])))
    assert [ok for ok, _ in seen] == [True, True, True]
    assert [ids[0] for _, ids in seen] == seq.out == greedy_reference(model, [1, 2, 3], 3)
    assert len(calls) == 1 + 2            # the prefill, then a forward for each token but the last


def test_text_stream_pieces_add_up_to_the_full_decode(bundled_gguf):
    """Windowed decoding of a real BPE tokenizer: spaces, newlines, multi-byte characters split
    over several tokens, and a stop string."""
    from llamaforge.tokenizer import Tokenizer
    tok = Tokenizer.load(bundled_gguf)
    text = "Héllo  wörld!\n\n  日本語 😀 and   spaces\tEND tail"
    ids = tok.encode(text)
    context = tok.encode("<|im_start|>assistant\n", special=True)
    ts = TextStream(tok, context_ids=context)
    assert "".join(ts.push(i) for i in ids) + ts.flush() == tok.decode(ids)
    ts = TextStream(tok, stop=("END",), context_ids=context)
    out = "".join(ts.push(i) for i in ids) + ts.flush()
    assert ts.stopped and out == tok.decode(ids)[:tok.decode(ids).index("END")]
