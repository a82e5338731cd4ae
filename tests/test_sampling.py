import pytest
import torch

from llamaforge.sampling import SamplingParams, apply_repetition_penalty, filter_logits, make_generator, sample


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


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.0), dict(repetition_penalty=0), dict(max_tokens=-1)])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
