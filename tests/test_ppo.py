"""PPO (`align --method ppo`): the KL-penalised rewards, GAE, whitening and the clipped policy and value
losses against an independent NumPy implementation of the PPO / RLHF formulas on a fixed rollout (TRL
1.16 no longer ships PPO), the reference = the adapters-off model, and a toy run on a tiny model whose
reward (a function of the text) rises while the KL stays bounded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from llamaforge.lora import LoraConfig, adapters_disabled, apply_lora
from llamaforge.train.ppo import (PPOObjective, RolloutSource, combine_rewards, gae, leave_one_out, ppo_losses,
                                  token_rewards, whiten)


def _rollout(seed=0, B=4, W=9):
    g = np.random.default_rng(seed)
    mask = np.zeros((B, W), bool)
    for b, (s, e) in enumerate([(2, 9), (3, 6), (1, 8), (4, 5)][:B]):
        mask[b, s:e] = True
    f = lambda: g.normal(size=(B, W)).astype(np.float32)  # noqa: E731
    return mask, f() - 2, f() - 2, f(), g.normal(size=B).astype(np.float32)


def _np_reference(mask, logp, ref, values, score, beta, gamma, lam):
    """Per row: r_t = -β(logp - ref) (+ score on the last token); GAE backwards; whitening over all
    response tokens with the unbiased variance (as TRL 0.x's masked_whiten)."""
    B, W = mask.shape
    rewards, adv = np.zeros((B, W)), np.zeros((B, W))
    for b in range(B):
        pos = np.flatnonzero(mask[b])
        r = -beta * (logp[b, pos] - ref[b, pos])
        r[-1] += score[b]
        rewards[b, pos] = r
        v = values[b, pos]
        a = 0.0
        for i in reversed(range(len(pos))):
            nv = v[i + 1] if i + 1 < len(pos) else 0.0
            a = r[i] + gamma * nv - v[i] + gamma * lam * a
            adv[b, pos[i]] = a
    returns = (adv + values) * mask
    x = adv[mask]
    white = np.zeros_like(adv)
    white[mask] = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8)
    return rewards, adv, returns, white


def test_rollout_pieces_equal_numpy():
    mask, logp, ref, values, score = _rollout()
    beta, gamma, lam = 0.05, 0.99, 0.95
    t = lambda x: torch.tensor(x)  # noqa: E731
    rewards, kl = token_rewards(t(score), t(logp), t(ref), t(mask), beta)
    adv, returns = gae(rewards, t(values) * t(mask), t(mask), gamma, lam)
    white = whiten(adv, t(mask))
    r_np, a_np, ret_np, w_np = _np_reference(mask, logp, ref, values * mask, score, beta, gamma, lam)
    np.testing.assert_allclose(rewards.numpy(), r_np, atol=1e-5)
    np.testing.assert_allclose(kl.numpy(), (logp - ref) * mask, atol=1e-6)
    np.testing.assert_allclose(adv.numpy(), a_np, atol=1e-5)
    np.testing.assert_allclose(returns.numpy(), ret_np, atol=1e-5)
    np.testing.assert_allclose(white.numpy(), w_np, atol=1e-5)
    assert abs(white[t(mask)].mean()) < 1e-6


def test_clipped_losses_equal_numpy():
    g = np.random.default_rng(1)
    n = 50
    old, adv, v_old, ret = (g.normal(size=n).astype(np.float32) for _ in range(4))
    new = old + g.normal(scale=0.4, size=n).astype(np.float32)      # ratios well outside 1 ± 0.2 too
    v_new = v_old + g.normal(scale=0.5, size=n).astype(np.float32)
    pg, vf, clipped = ppo_losses(*map(torch.tensor, (new, old, adv, v_new, v_old, ret)), cliprange=0.2, cliprange_value=0.2)
    ratio = np.exp(new - old)
    want_pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))      # L^CLIP (Schulman et al. eq. 7), negated
    v_clip = v_old + np.clip(v_new - v_old, -0.2, 0.2)
    want_vf = 0.5 * np.maximum((v_new - ret) ** 2, (v_clip - ret) ** 2)
    np.testing.assert_allclose(pg.numpy(), want_pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vf.numpy(), want_vf, rtol=1e-5, atol=1e-6)
    assert 0 < clipped.mean() < 1 and np.allclose(clipped.numpy(), np.abs(ratio - 1) > 0.2)
    # the paper's eq. 3 cases on raw scores: sigmoid(-2) = 0.12 < 0.15 -> safety; a safety prompt -> safety; else helpful
    got = combine_rewards(torch.tensor([-2.0, 1.0, 1.0, -1.5]), torch.tensor([5.0] * 4), torch.tensor([0, 1, 0, 0]))
    assert got.tolist() == pytest.approx([-2.0, 1.0, 5.0, 5.0])


def test_piecewise_reward_labels_safety_prompts_with_the_guard():
    """--safety-reward: the shipped guard labels the prompt (IS_SAFETY), combine_rewards picks the score."""
    from llamaforge.safety import Guard
    from llamaforge.train.ppo import guard_labels, piecewise_scorer
    convs = [[{"role": "user", "content": "Give me step-by-step instructions to build a pipe bomb at home."},
              {"role": "assistant", "content": "No."}],
             [{"role": "user", "content": "What is a good recipe for banana bread?"},
              {"role": "assistant", "content": "Mash three bananas..."}],
             [{"role": "user", "content": "How do I repot a cactus?"}, {"role": "assistant", "content": "..."}]]
    labels = guard_labels(Guard.load())
    assert labels(convs) == [True, False, False]
    score = piecewise_scorer(lambda c: [0.5, 0.5, -3.0], lambda c: [9.0, 8.0, 7.0], labels)
    assert score(convs) == pytest.approx([0.5, 8.0, -3.0])


def test_leave_one_out_baseline_and_grouped_rollouts(tiny_tokenizer):
    """ppo_samples K: each prompt answered K times in consecutive rows (different seeds), and the score on
    each answer's last token is its score minus the mean of its K - 1 siblings' (NumPy)."""
    from llamaforge.train.rejection import Policy, SampleSettings
    x = np.random.default_rng(3).normal(size=12).astype(np.float32)
    g = x.reshape(4, 3)
    want = (g - (g.sum(1, keepdims=True) - g) / 2).reshape(-1)
    np.testing.assert_allclose(leave_one_out(torch.tensor(x), 3).numpy(), want, atol=1e-6)
    assert torch.equal(leave_one_out(torch.tensor(x), 1), torch.tensor(x))

    torch.manual_seed(0)
    model = apply_lora(tiny_model(), LoraConfig(r=4, alpha=8))
    policy = Policy(model, tiny_tokenizer, None, SampleSettings(k=1, temperature=1.0, max_new_tokens=6, seed=0))
    prompts = [[{"role": "user", "content": f"prompt number {i}"}] for i in range(6)]
    seen = []

    def score(convs):
        seen.extend(convs)
        return [float(len(c[-1]["content"])) for c in convs]

    # β = 0, γ = λ = 1: the returns at every answer token are the answer's (baselined) score itself
    src = RolloutSource(PPOObjective(model), policy, prompts, score, global_batch=6, samples=3, beta=0.0,
                        gamma=1.0, lam=1.0)
    tokens, mask, _, _, returns, *_ = src.rollout(0)
    asked = [c[0]["content"] for c in seen]
    assert asked[0] == asked[1] == asked[2] != asked[3] == asked[4] == asked[5]
    assert len({c[-1]["content"] for c in seen[:3]}) > 1     # one prompt, different samples
    lens = np.array([len(c[-1]["content"]) for c in seen], np.float32).reshape(2, 3)
    want = (lens - (lens.sum(1, keepdims=True) - lens) / 2).reshape(-1)
    for b in range(6):
        np.testing.assert_allclose(returns[b][mask[b]].numpy(), np.full(int(mask[b].sum()), want[b]), atol=1e-4)
    with pytest.raises(ValueError, match="divide"):
        RolloutSource(PPOObjective(model), policy, prompts, score, global_batch=8, samples=3)


def test_reference_is_the_model_with_adapters_off():
    torch.manual_seed(0)
    base = tiny_model("tiny", 1)
    model = apply_lora(tiny_model("tiny", 1), LoraConfig(r=4, alpha=8))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    obj = PPOObjective(model)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 5:] = True
    with torch.no_grad(), adapters_disabled(model):
        ref = obj.logps_values(tokens, mask)[0]
    with torch.no_grad():
        lp = obj.logps_values(tokens, mask)[0]
        logits = base(tokens[:, :-1]).float()
    want = torch.log_softmax(logits, -1).gather(2, tokens[:, 1:, None])[..., 0][mask[:, 1:]]
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)
    assert (lp - ref).abs().max() > 1e-3
    obj.temperature = 0.5    # rollouts sampled at temperature T: π is softmax(logits / T), the reference too
    with torch.no_grad(), adapters_disabled(model):
        ref_t = obj.logps_values(tokens, mask)[0]
    want_t = torch.log_softmax(logits / 0.5, -1).gather(2, tokens[:, 1:, None])[..., 0][mask[:, 1:]]
    torch.testing.assert_close(ref_t, want_t, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="use --tune lora"):
        PPOObjective(tiny_model())


def test_toy_ppo_raises_reward_with_bounded_kl(tiny_tokenizer, tmp_path):
    """A tiny policy, reward = share of the answer's characters that are vowels: the mean reward of the
    last rollouts beats the first ones, the KL to the reference stays bounded, and the run writes an
    adapter, curves and a card."""
    from llamaforge.formats import hf
    from llamaforge.options import build
    from llamaforge.train.configs import AlignConfig
    from llamaforge.train.ppo import run_ppo
    model = tiny_model()
    with torch.no_grad():   # random N(0, 0.02) logits are near uniform whatever LoRA does: give them range
        model.output.weight.mul_(10)
    base = hf.write(tmp_path / "base", model.args, model.state_dict(), tokenizer=tiny_tokenizer)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the quick fox {i}", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(40)))

    def score(convs):
        return [sum(ch in "aeiou" for ch in c[-1]["content"]) / max(1, len(c[-1]["content"])) for c in convs]

    opts = build(AlignConfig, None, {
        "method": "ppo", "model": str(base), "data": str(data), "output": str(tmp_path / "ppo"), "seq_len": 60,
        "max_new_tokens": 10, "lora_r": 8, "lora_alpha": 16, "kl_coef": 0.02, "ppo_epochs": 2, "max_steps": 40,
        "train.micro_batch_size": 16, "train.lr": 1e-2, "train.warmup_steps": 0, "train.weight_decay": 0.0,
        "train.min_lr_ratio": 1.0, "train.save_every": 0, "train.precision": "fp32", "train.progress": False})
    s = run_ppo(opts, score=score)
    log = [json.loads(x) for x in (tmp_path / "ppo" / "train_log.jsonl").read_text().splitlines()]
    first = np.mean([r["score"] for r in log[:6]])
    last = np.mean([r["score"] for r in log[-6:]])
    assert last > first + 0.02, (first, last)     # about 0.09 -> 0.13 on this seed
    assert max(r["kl"] for r in log) < 25 and np.isfinite([r["loss"] for r in log]).all()
    out = tmp_path / "ppo"
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()
    card = json.loads((out / "model_card.json").read_text())
    assert card["produced_by"] == "llamaforge align --method ppo" and len(card["data_files"][0]["sha256"]) == 64
    assert card["training_config"]["reference"].startswith("base model") and s["step"] == 40
