"""Speculative decoding by prompt lookup: the same tokens as plain decoding, fewer forwards."""
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from llamaforge.generate import Batch, generate
from llamaforge.sampling import SamplingParams
from llamaforge.speculative import NgramIndex, PromptLookup, as_lookup

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "wikitext2_test.raw"
# a real paragraph (wikitext-2), with a short stand-in when the shared data is absent
PASSAGE = (next((line.strip() for line in DATA.read_text(encoding="utf-8").splitlines() if len(line) > 600), "")[:700]
           if DATA.exists() else "") or (
    "Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the "
    "television series The Bill in 2000 . This was followed by a starring role in the play Herons written by "
    "Simon Stephens , which was performed in 2001 at the Royal Court Theatre .")


def ids_of(events):
    return [ev.id for ev in events]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny", seed=0)


@pytest.fixture(scope="module")
def llm(bundled_gguf):
    from llamaforge.api import Llama
    return Llama.load(bundled_gguf)


# -- drafting ----------------------------------------------------------------------------------
def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence():
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3], ngram_min=1, ngram_max=3)
    assert index.draft(3) == ([4, 5, 9], 3)        # the suffix [1, 2, 3] itself has no follower yet
    index.extend([6])                              # [2, 3, 6], [3, 6], [6]: never seen
    assert index.draft(4) == ([], 0)
    index.extend([2, 3])                           # [6, 2, 3] unseen; [2, 3] last followed by 6
    assert index.draft(2) == ([6, 2], 2)
    assert NgramIndex([5], 1, 3).draft(4) == ([], 0)
    assert NgramIndex([5, 5, 5], 1, 2).draft(4) == ([5], 2)   # the draft stops at the list's end


def test_bad_settings_are_clear_errors(tiny, capsys):
    for bad in (dict(k=0), dict(k=-2), dict(ngram_min=0), dict(ngram_min=3, ngram_max=2), dict(k=2.5)):
        with pytest.raises(ValueError, match="lookup"):
            PromptLookup(**bad)
    for bad in (-1, "8", True, 1.5):
        with pytest.raises(ValueError, match="lookup"):
            as_lookup(bad)
    assert as_lookup(0) is None and as_lookup(None) is None and as_lookup(5).k == 5
    with pytest.raises(ValueError, match="lookup"):
        list(generate(tiny, [1, 2, 3], SamplingParams(max_tokens=4), lookup=-3))
    from llamaforge.cli import main
    assert main(["generate", "hi", "--lookup", "-1"]) == 2
    assert "lookup must be" in capsys.readouterr().err


# -- identity on a tiny random model -------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 8])
def test_tiny_greedy_identical_and_drafts_accepted(tiny, k):
    prompts = [[5, 17, 99, 3, 250, 8] * 4, list(range(1, 40)), [7, 7, 7, 7]]
    accepted = 0
    for prompt in prompts:
        params = SamplingParams(max_tokens=60)
        look = PromptLookup(k=k, adaptive=False)
        assert ids_of(generate(tiny, prompt, params, lookup=look)) == ids_of(generate(tiny, prompt, params))
        assert look.stats.drafted >= look.stats.accepted
        accepted += look.stats.accepted
    assert accepted > 10     # random weights loop, so their own output drafts well


def test_tiny_sampling_penalties_logprobs_and_processor_follow_plain_decoding(tiny):
    """Every emitted token is sampled from its own row in order, so a seeded sampler, penalties,
    logprobs and a logits processor see exactly the calls of plain decoding."""
    params = SamplingParams(max_tokens=50, temperature=0.7, top_k=20, seed=11, presence_penalty=0.3,
                            frequency_penalty=0.2, repetition_penalty=1.1, logprobs=True)

    def run(lookup):
        calls = []

        def processor(out, logits):
            calls.append(len(out))
            return logits.index_fill(0, torch.tensor([13]), float("-inf"))    # ban a token

        batch = Batch(tiny, max_batch=1, max_seq=128, lookup=lookup)
        seq = batch.add([9, 8, 7, 9, 8, 7, 9, 8], params)
        seq.logits_processor = processor
        while not seq.finish_reason:
            batch.step()
        return seq.out, seq.logprobs, calls

    look = PromptLookup(k=4, ngram_min=1, adaptive=False)    # 1-gram hits too: drafts on sampled text
    out, lps, calls = run(look)
    ref_out, ref_lps, ref_calls = run(None)
    assert out == ref_out and calls == ref_calls == list(range(len(ref_out)))
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert 13 not in out and look.stats.drafted > 0


def test_near_the_context_limit(tiny):
    """Drafts are cut to the room left in the window; the last position is max_seq_len - 1."""
    n = tiny.args.max_seq_len - 6
    # the model's own greedy text (it loops), so its continuation is found earlier in the prompt
    prompt = [7, 7, 7, 7] + ids_of(generate(tiny, [7, 7, 7, 7], SamplingParams(max_tokens=n - 4)))
    params = SamplingParams(max_tokens=50)
    look = PromptLookup(k=8, adaptive=False)
    events = list(generate(tiny, prompt, params, lookup=look))
    assert ids_of(events) == ids_of(generate(tiny, prompt, params))
    assert len(events) == 6 and events[-1].finish_reason == "length"
    assert look.stats.verifies > 0


# -- the bundled model: bitwise the same logits, so the same tokens --------------------------------
def test_bundled_greedy_identical_on_grounded_and_free_text(llm):
    grounded = llm.encode_chat([{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}])
    free = llm.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=80)
    for prompt, lookups in ((grounded, [PromptLookup(k=8), PromptLookup(k=5, adaptive=False)]),
                            (free, [PromptLookup(k=8, adaptive=False)])):
        plain = ids_of(generate(llm.model, prompt, params, llm.tokenizer))
        for look in lookups:
            assert ids_of(generate(llm.model, prompt, params, llm.tokenizer, lookup=look)) == plain
            assert look.stats.drafted > 0


def test_bundled_drafts_accepted_and_api_stop_strings(llm):
    messages = [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}]
    look = PromptLookup(k=8, adaptive=False)     # adaptive drafting depends on timings: not here
    fast = llm.chat(messages, max_tokens=80, lookup=look)
    assert fast.tokens == llm.chat(messages, max_tokens=80).tokens
    assert look.stats.accepted >= 20 and look.stats.verifies < look.stats.accepted   # > 1 token per verify
    stop = fast.text.split()[len(fast.text.split()) // 2]     # a word from the middle of an accepted run
    a = llm.chat(messages, max_tokens=80, stop=[stop], lookup=PromptLookup(k=8, adaptive=False))
    b = llm.chat(messages, max_tokens=80, stop=[stop])
    assert (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason) and a.finish_reason == "stop"
    with pytest.raises(ValueError, match="lookup"):
        llm.complete("hi", lookup=-1)


def test_rejected_drafts_leave_the_cache_of_plain_decoding(llm):
    """A rejected draft's keys stay in the slot past seq.fed; the next rows never see them, and the
    first fed positions hold plain decoding's keys and values bit for bit."""
    prompt = llm.encode_chat([{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}])
    params = SamplingParams(max_tokens=40)
    runs = {}
    for lookup in (None, PromptLookup(k=6, ngram_min=1, adaptive=False)):
        batch = Batch(llm.model, llm.tokenizer, max_batch=1, max_seq=len(prompt) + 48, lookup=lookup)
        seq = batch.add(prompt, params)
        while not seq.finish_reason:
            batch.step()
        runs[lookup is None] = (batch, seq, lookup)
    (plain, ref, _), (fast, seq, look) = runs[True], runs[False]
    assert seq.out == ref.out
    assert look.stats.accepted > 0 and look.stats.accepted < look.stats.drafted    # some drafts were rejected
    n = min(seq.fed, ref.fed)
    assert n >= len(prompt) + 30
    assert torch.equal(fast.cache.k[:, 0, :, :n], plain.cache.k[:, 0, :, :n])
    assert torch.equal(fast.cache.v[:, 0, :, :n], plain.cache.v[:, 0, :, :n])


def test_batched_drafting_keeps_each_sequence_plain(llm):
    """In a Batch, sequences draft while at most lookup_max_batch are going: a grounded and a free
    prompt decoding together give each its own plain greedy tokens; with the default
    lookup_max_batch=1 nothing is drafted until one of them is left alone."""
    grounded = llm.encode_chat([{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}])
    free = llm.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    short, long = SamplingParams(max_tokens=12), SamplingParams(max_tokens=50)
    plain = [ids_of(generate(llm.model, p, sp, llm.tokenizer)) for p, sp in ((grounded, long), (free, short))]
    for max_batch_drafting in (2, 1):
        look = PromptLookup(k=6, adaptive=False)
        batch = Batch(llm.model, llm.tokenizer, max_batch=2, max_seq=len(grounded) + 64, lookup=look,
                      lookup_max_batch=max_batch_drafting)
        seqs = [batch.add(grounded, long), batch.add(free, short)]
        drafted_together = None
        while not all(s.finish_reason for s in seqs):
            before = look.stats.drafted
            batch.step()
            if drafted_together is None and seqs[1].finish_reason:
                drafted_together = before      # drafts made while both were going
        assert [s.out for s in seqs] == plain
        assert look.stats.accepted > 0
        assert (drafted_together > 0) if max_batch_drafting == 2 else (drafted_together == 0)


def test_adaptive_budget_drafts_long_when_drafts_are_kept_and_stops_when_they_are_not():
    from llamaforge.speculative import _Budget
    b = _Budget(8, range(3, 0, -1), adaptive=True)
    b.timed(0, 0.010)                       # a plain step: 10 ms
    for _ in range(10):
        b.record(3, 8, 8)                   # 3-gram drafts kept whole
        b.record(1, 4, 0)                   # 1-gram drafts rejected at once
        b.timed(8, 0.010 * 3.0)             # 9 rows cost 3 steps
    assert b.length(3, 8) == 8 and b.length(3, 2) == 2
    assert b.length(1, 8) == 0              # and a skipped hit creeps back towards the prior
    assert b.rate[1] > 0 and _Budget(8, range(3, 0, -1), adaptive=False).length(1, 5) == 5


# -- a draft model ---------------------------------------------------------------------------------
def test_draft_model_keeps_plain_decoding_output(llm, tmp_path):
    """--draft-model: a second model proposes, the target verifies: greedy output is token for token
    plain decoding's with a draft that is always right (the model itself: every draft kept), one that
    is mostly wrong (a random model with the same vocabulary), and through the CLI."""
    import subprocess
    import sys

    from llamaforge.config import PRESETS
    from llamaforge.formats import gguf
    from llamaforge.model import Transformer
    from llamaforge.speculative import DraftModel
    prompt = llm.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=40)
    plain = ids_of(generate(llm.model, prompt, params, llm.tokenizer))
    same = llm.drafter(4)
    assert ids_of(generate(llm.model, prompt, params, llm.tokenizer, lookup=same)) == plain
    assert same.stats.accepted == same.stats.drafted > 20          # it drafts what the target decodes
    args = PRESETS["tiny"].replace(vocab_size=llm.args.vocab_size, max_seq_len=512)
    rand = DraftModel(Transformer(args).init_weights(seed=3).eval(), k=3)
    assert ids_of(generate(llm.model, prompt, params, llm.tokenizer, lookup=rand)) == plain
    assert rand.stats.drafted > 0 and rand.stats.accepted < rand.stats.drafted
    # sampled decoding with a seed: the same tokens as plain decoding too
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5)
    assert ids_of(generate(llm.model, prompt, sampled, llm.tokenizer, lookup=llm.drafter(3))) == \
        ids_of(generate(llm.model, prompt, sampled, llm.tokenizer))
    # a draft with another vocabulary is refused
    other = DraftModel(Transformer(PRESETS["tiny"]).init_weights(seed=0).eval())
    with pytest.raises(ValueError, match="same tokenizer"):
        list(generate(llm.model, prompt, params, llm.tokenizer, lookup=other))
    with pytest.raises(ValueError, match=">= 1"):
        DraftModel(llm.model, k=0)
    # the CLI: the bundled model drafting for itself gives the plain output
    cmd = [sys.executable, "-m", "llamaforge.cli", "generate", "Once upon a time", "--max-tokens", "16"]
    a = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    b = subprocess.run(cmd + ["--draft-model", str(llm.checkpoint.path), "--lookup", "3"], capture_output=True,
                       text=True, timeout=300)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout and len(a.stdout.split()) > 5
