import pytest
import torch

from llamaforge.sampling import (SamplingParams, adjust_logits, apply_logit_bias, apply_presence_frequency,
                                 apply_repetition_penalty, choice_seed, filter_logits, make_generator, sample)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy_even_when_sampling():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    for seed in range(20):
        assert sample(logits, SamplingParams(temperature=1.5, top_k=1, seed=seed), make_generator(seed)) == best
        assert sample(logits, SamplingParams(temperature=1.5, top_p=1e-6), make_generator(seed)) == best


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_logits(probs.log(), top_p=0.8)
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_logits(probs.log(), top_p=0.81)
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_min_p_scales_with_the_top_probability():
    probs = torch.tensor([0.6, 0.3, 0.07, 0.03])
    out = filter_logits(probs.log(), min_p=0.1)  # threshold 0.06
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_top_k_masks_all_but_k():
    out = filter_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), top_k=2)
    assert torch.isfinite(out).tolist() == [False, True, True, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.tensor([0.0, 0.0, 1.0])
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(50)]
    g = make_generator(7)
    b = [sample(logits, p, g) for _ in range(50)]
    assert a == b
    g = make_generator(1)
    draws = torch.tensor([sample(logits, p, g) for _ in range(4000)])
    expected = torch.softmax(logits, -1)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.03)


def test_presence_and_frequency_penalties_follow_openais_formula():
    """logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c[j] = times j was generated; written
    out here token by token, next to the vectorized function."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    generated = [4, 9, 4, 4, 17, 9, 0]
    for presence, frequency in ((0.7, 0.0), (0.0, 1.3), (-0.5, 2.0), (2.0, -2.0)):
        expect = logits.clone()
        for j in range(50):
            c = generated.count(j)
            expect[j] = logits[j] - c * frequency - (1.0 if c > 0 else 0.0) * presence
        out = apply_presence_frequency(logits, torch.tensor(generated), presence, frequency)
        torch.testing.assert_close(out, expect)
        params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
        torch.testing.assert_close(adjust_logits(logits, params, generated=torch.tensor(generated)), expect)
        assert sample(logits, params, generated=torch.tensor(generated)) == int(expect.argmax())
    assert apply_presence_frequency(logits, torch.tensor([], dtype=torch.long), 1.0, 1.0) is logits


def test_logit_bias_adds_to_the_logits_before_sampling():
    logits = torch.tensor([1.0, 5.0, 2.0, float("-inf")])
    out = apply_logit_bias(logits, SamplingParams(logit_bias={1: -100, 2: 0.5, 3: 100}).logit_bias)
    assert out.tolist() == [1.0, -95.0, 2.5, float("-inf")]     # a masked token stays masked
    assert sample(logits, SamplingParams(logit_bias={1: -100})) == 2        # greedy: the runner-up
    assert sample(logits, SamplingParams(logit_bias={0: 100})) == 0         # forced
    for seed in range(5):   # sampled too: +100 leaves the other tokens e^-96 of the mass
        p = SamplingParams(temperature=1.0, logit_bias={2: 100})
        assert sample(logits, p, make_generator(seed)) == 2
    assert logits.tolist() == [1.0, 5.0, 2.0, float("-inf")]   # pure: the input is untouched


def test_choice_seeds_differ_and_choice_zero_keeps_the_seed():
    assert choice_seed(None, 3) is None and choice_seed(42, 0) == 42
    for seed in (0, 42, -1, 2 ** 64 - 1, -(2 ** 63)):
        seeds = [choice_seed(seed, i) for i in range(16)]
        assert len(set(seeds)) == 16 and all(0 <= x < 2 ** 64 for x in seeds[1:])
        assert all(SamplingParams(seed=x).seed == x for x in seeds)    # each a valid seed


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.0), dict(repetition_penalty=0), dict(max_tokens=-1),
                                 dict(presence_penalty=2.5), dict(frequency_penalty=-2.01),
                                 dict(frequency_penalty=float("nan")), dict(logit_bias={5: 101}),
                                 dict(logit_bias={-1: 1}), dict(logit_bias={"5": 1}),
                                 dict(logit_bias={5: float("nan")})])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
