"""PPO (Schulman et al. 2017) as Llama 2 used it (§3.2.3): a LoRA policy with a value head, the reward
model's score minus β·KL(policy ‖ reference), GAE advantages whitened per rollout, the clipped objective.

The reference is the same model with its LoRA adapters disabled (``lora.adapters_disabled``): no
second copy in memory. Rollouts are made by ``RolloutSource``, a BatchSource of the one trainer: the
batch of step s is sampled from the policy as it is at that step (``rejection.Policy``: one Batch, a
seed per answer), scored, and reused for ``ppo_epochs`` consecutive steps; ``PPOObjective`` computes
the losses. Per-token tensors are [rows, W] aligned with the tokens: position t holds the value for
token t, which is a response token where ``mask[:, t]``.

Formulas (TRL's 0.x PPOTrainer, the reference implementation of RLHF PPO, uses the same):
  r_t = -β (log π(y_t) - log π_ref(y_t)), plus the score on the last response token (with
  ppo_samples K > 1 answers per prompt, the score minus the mean of its K - 1 siblings' scores);
  δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1} (V past the end = 0), returns = A + V;
  A is whitened over the rollout's response tokens (mean 0, unbiased variance 1);
  policy loss = mean max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), ρ = exp(log π - log π_old);
  value loss = ½ mean max((V - R)², (clip(V, V_old ± ε_v) - R)²); loss = policy + vf_coef · value.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..lora import adapters_disabled, lora_modules
from .rejection import Policy, Scorer, sample_seed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the pieces (pure functions)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, variance with Bessel's correction."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * m


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate log π - log π_ref) of rows [B, W]; the score is
    added at each row's last response token."""
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -beta * kl
    last = (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(1)
    rewards[torch.arange(mask.shape[0]), last] += score.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards, kl


def leave_one_out(score: torch.Tensor, group: int) -> torch.Tensor:
    """Each score minus the mean score of the other answers to its prompt (RLOO's baseline, Ahmadian et
    al. 2024): rows come in consecutive groups of `group` answers to one prompt. What is left is how
    much better an answer is than its siblings, not how easy its prompt is to score well on."""
    if group <= 1:
        return score
    g = score.reshape(-1, group)
    return ((g - (g.sum(1, keepdim=True) - g) / (group - 1))).reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over each row's response tokens
    (the masked positions, in order; the value after the last one is 0)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = torch.nonzero(mask[b]).flatten()
        last = 0.0
        for i in range(len(pos) - 1, -1, -1):
            t = pos[i]
            nxt = values[b, pos[i + 1]] if i + 1 < len(pos) else 0.0
            delta = rewards[b, t] + gamma * nxt - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, *, cliprange: float = 0.2,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (clipped policy loss, clipped value loss, clipped-or-not indicator), all [N]."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    vclip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (vclip - returns) ** 2)
    clipped = ((ratio - 1).abs() > cliprange).float()
    return pg, vf, clipped


def combine_rewards(safety: torch.Tensor, helpful: torch.Tensor, is_safety: torch.Tensor,
                    threshold: float = 0.15) -> torch.Tensor:
    """The paper's piecewise reward (eq. 3) on raw reward-model scores (logits): the safety model's score
    on safety prompts or when its sigmoid is below the threshold, else the helpfulness model's. The
    paper's LOGIT of the chosen sigmoid score is the raw score itself; its whitening is the rollout's."""
    return torch.where(is_safety.bool() | (torch.sigmoid(safety) < threshold), safety, helpful)


def piecewise_scorer(safety: Scorer, helpful: Scorer, is_safety: Callable[[list[list[dict[str, str]]]], list[bool]],
                     threshold: float = 0.15) -> Scorer:
    """A Scorer of conversations by combine_rewards: `is_safety` labels each conversation's prompt."""
    def score(convs: list[list[dict[str, str]]]) -> list[float]:
        s, h = (torch.tensor(f(convs), dtype=torch.float32) for f in (safety, helpful))
        return combine_rewards(s, h, torch.tensor(is_safety(convs)), threshold).tolist()
    return score


def guard_labels(guard) -> Callable[[list[list[dict[str, str]]]], list[bool]]:
    """IS_SAFETY(prompt) of the paper from a moderation guard: the last user turn before the answer is flagged."""
    def label(convs: list[list[dict[str, str]]]) -> list[bool]:
        prompts = [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in convs]
        return [not v.safe for v in guard.check_batch(prompts)]
    return label


# ---------------------------------------------------------------- the objective

class PPOObjective(nn.Module):
    """Clipped PPO loss + value loss on a LoRA policy; ``value_head`` reads the final hidden state
    before each response token. Units are response tokens."""

    curves = {"reward": ["score"], "KL (per answer)": ["kl"], "PPO": ["pg_loss", "vf_loss", "clipfrac"]}
    loss_label = "loss (per response token)"

    def __init__(self, model: nn.Module, *, cliprange: float = 0.2, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1, seed: int = 0, temperature: float = 1.0):
        super().__init__()
        if not lora_modules(model):
            raise ValueError("PPO trains LoRA adapters (the reference is the model with them disabled): use --tune lora")
        self.model = model
        self.value_head = nn.Linear(model.args.dim, 1, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.value_head.weight.copy_(torch.randn(self.value_head.weight.shape, generator=g) * 0.02)
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.temperature = temperature

    def logps_values(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(token) and V at every response position, flattened in mask[:, 1:] order. π is the
        distribution the rollouts sample from: the logits divided by the sampling temperature."""
        tmask = mask[:, 1:].bool()
        h = self.model.hidden(tokens[:, :-1])[tmask]
        logits = self.model.output(h).float() / self.temperature
        logp = torch.log_softmax(logits, -1).gather(1, tokens[:, 1:][tmask].unsqueeze(1)).squeeze(1)
        return logp, self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, tokens, mask, old_logp, advantages, returns, old_values, kl, score, scale, weight):
        tmask = mask[:, 1:].bool()
        w = weight[:, None].expand_as(tmask)[tmask]
        logp, values = self.logps_values(tokens, mask)

        def flat(x):
            return x[:, 1:][tmask]

        pg, vf, clipped = ppo_losses(logp, flat(old_logp), flat(advantages), values, flat(old_values), flat(returns),
                                     cliprange=self.cliprange, cliprange_value=self.cliprange_value)
        loss = ((pg + self.vf_coef * vf) * w).sum()
        with torch.no_grad():   # per-answer means come out of the trainer's per-token division via scale
            metrics = {"pg_loss": (pg * w).sum(), "vf_loss": (vf * w).sum(), "clipfrac": (clipped * w).sum(),
                       "kl": (kl.sum(1) * scale * weight).sum(), "score": (score * scale * weight).sum()}
        return loss, metrics

    def units(self, batch) -> float:
        return float((batch[1][:, 1:].sum(1) * batch[-1]).sum())

    def n_tokens(self, batch) -> int:
        return int(batch[0][:, :-1].numel())

    def blank(self, batch):
        return (*batch[:-1], torch.zeros_like(batch[-1]))


# ---------------------------------------------------------------- rollouts


class RolloutSource:
    """Rollouts as the trainer's batches: global batch G of step s comes from rollout s // ppo_epochs,
    G / samples prompts (a seeded permutation per pass over the prompts), each answered `samples`
    times by the current policy (consecutive rows)."""

    def __init__(self, objective: PPOObjective, policy: Policy, prompts: Sequence[list[dict[str, str]]],
                 score: Scorer, *, global_batch: int, ppo_epochs: int = 1, beta: float = 0.05, gamma: float = 1.0,
                 lam: float = 0.95, seed: int = 0, pad_id: int = 0, samples: int = 1):
        if not prompts:
            raise ValueError("no prompts for PPO rollouts")
        if samples < 1 or global_batch % samples:
            raise ValueError(f"ppo_samples ({samples}) must be >= 1 and divide the rollout's {global_batch} answers "
                             "(train.micro_batch_size x train.grad_accum)")
        self.obj, self.policy, self.prompts, self.score = objective, policy, list(prompts), score
        self.G, self.epochs, self.beta, self.gamma, self.lam = global_batch, ppo_epochs, beta, gamma, lam
        self.samples = samples
        self.seed, self.pad_id = seed, pad_id
        self._cache: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def _prompt(self, j: int) -> int:
        epoch, i = divmod(j, len(self.prompts))
        return int(np.random.default_rng([self.seed, 9, epoch]).permutation(len(self.prompts))[i])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        n = indices[0] // (self.G * self.epochs)
        if self._cache is None or self._cache[0] != n:
            self._cache = (n, self.rollout(n))
        offset = indices[0] % self.G
        return tuple(t[offset:offset + len(indices)] for t in self._cache[1])

    @torch.no_grad()
    def rollout(self, n: int) -> tuple[torch.Tensor, ...]:
        """Sample, score and evaluate rollout n: the batch tuple PPOObjective reads, for all G rows."""
        model = self.obj.model
        was = model.training
        model.eval()   # no LoRA dropout while sampling and in the old/reference log-probs
        try:
            per = self.G // self.samples
            picks = [self._prompt(n * per + j // self.samples) for j in range(self.G)]
            ids = [self.policy.prompt_ids(self.prompts[p]) for p in picks]
            seqs = self.policy.generate(ids, [sample_seed(self.seed, n, j) for j in range(self.G)])
            rows = [(p + list(q.out)) for p, q in zip(ids, seqs)]
            width = max(len(r) for r in rows)
            tokens = torch.full((self.G, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(self.G, width, dtype=torch.bool)
            for b, (p, r) in enumerate(zip(ids, rows)):
                tokens[b, :len(r)] = torch.tensor(r)
                mask[b, len(p):len(r)] = True
            convs = [self.prompts[p] + [{"role": "assistant", "content": q.stream.text.strip()}]
                     for p, q in zip(picks, seqs)]
            score = torch.tensor(self.score(convs), dtype=torch.float32)
            tmask = mask[:, 1:]
            old_logp, old_values, ref_logp = (torch.zeros(self.G, width) for _ in range(3))
            lp, v = self.obj.logps_values(tokens, mask)
            old_logp[:, 1:][tmask], old_values[:, 1:][tmask] = lp, v
            with adapters_disabled(model):
                ref_logp[:, 1:][tmask] = self.obj.logps_values(tokens, mask)[0]
        finally:
            model.train(was)
        rewards, kl = token_rewards(leave_one_out(score, self.samples), old_logp, ref_logp, mask, self.beta)
        adv, returns = gae(rewards, old_values * mask, mask, self.gamma, self.lam)
        adv = whiten(adv, mask)
        n_tok = mask[:, 1:].sum(1).float()
        scale = torch.full((self.G,), float(n_tok.sum()) / self.G)   # per-token division -> per-answer mean
        return tokens, mask, old_logp, adv, returns, old_values, kl, score, scale, (n_tok > 0).float()


# ---------------------------------------------------------------- the align method

def run_ppo(opts, score: Scorer | None = None) -> dict:
    """`align --method ppo`: PPO of a LoRA policy against the reward model (--reward), prompts from the
    train split; score overrides the reward model (a function of the conversations, e.g. in tests)."""
    import os
    import time
    from pathlib import Path

    from ..cards import sha256_file
    from ..lora import LoraConfig, apply_lora, save_adapter_tensors
    from .align_inputs import data_files, split_and_base, train_config
    from .distributed import setup
    from .rejection import SampleSettings, train_prompts
    from .reward import Reward
    from .trainer import Trainer

    started = time.time()
    if opts.tune != "lora":
        raise ValueError("--method ppo trains LoRA adapters (its reference is the model with them disabled): use --tune lora")
    if score is None and not opts.reward:
        raise ValueError("--method ppo needs a reward model: --reward DIR (train one with --method reward)")
    for folder in (opts.reward, opts.safety_reward):
        if folder and not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: reward model folder not found")
    if opts.safety_reward and not opts.reward:
        raise ValueError("--safety-reward combines with the helpfulness reward model: pass --reward DIR too")
    if not 0.0 < float(opts.safety_threshold) < 1.0:
        raise ValueError(f"safety_threshold must be between 0 and 1, got {opts.safety_threshold}")
    if float(opts.temperature) <= 0:
        raise ValueError(f"PPO samples its rollouts: --temperature must be > 0, got {opts.temperature}")
    if int(opts.ppo_epochs) < 1:
        raise ValueError(f"ppo_epochs must be >= 1, got {opts.ppo_epochs}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("PPO runs in one process: start it without torchrun")
    cfg = train_config(opts)
    ctx = setup(cfg.strategy)
    train_p, held_p, model, ckpt, template, seq_len = split_and_base(opts)
    tok = ckpt.tokenizer
    lora_cfg = LoraConfig(r=int(opts.lora_r), alpha=float(opts.lora_alpha), dropout=float(opts.lora_dropout),
                          targets=tuple(opts.lora_targets))
    torch.manual_seed(cfg.seed)
    apply_lora(model, lora_cfg)
    settings = SampleSettings(k=1, temperature=float(opts.temperature), top_p=float(opts.top_p),
                              max_new_tokens=int(opts.max_new_tokens), seed=int(opts.sample_seed))
    policy = Policy(model, tok, template, settings, max_seq=seq_len)
    items, too_long = train_prompts(train_p, policy)
    items = items[:opts.num_prompts] if opts.num_prompts is not None else items
    if not items:
        raise ValueError(f"{opts.data}: no prompt of the train split fits in seq_len {seq_len} "
                         f"with max_new_tokens {settings.max_new_tokens}")
    if score is None:
        rm = Reward.load(opts.reward)
        score = lambda convs: rm.score(convs, batch_size=8)  # noqa: E731
        if opts.safety_reward:
            from ..safety import Guard
            srm = Reward.load(opts.safety_reward)
            score = piecewise_scorer(lambda convs: srm.score(convs, batch_size=8), score, guard_labels(Guard.load()),
                                     float(opts.safety_threshold))
    objective = PPOObjective(model, cliprange=float(opts.cliprange), vf_coef=float(opts.vf_coef), seed=cfg.seed,
                             temperature=settings.temperature)
    source = RolloutSource(objective, policy, [p for _, p in items], score,
                           global_batch=cfg.micro_batch_size * cfg.grad_accum, ppo_epochs=int(opts.ppo_epochs),
                           beta=float(opts.kl_coef), gamma=float(opts.gamma), lam=float(opts.lam),
                           seed=int(opts.sample_seed), pad_id=tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0),
                           samples=int(opts.ppo_samples))
    base_name = str(ckpt.path) if ckpt.path else str(opts.model)

    def export(state: dict[str, torch.Tensor], directory: Path) -> None:
        save_adapter_tensors(state, model.args, lora_cfg, directory, base_model=base_name)

    settings_card = {"method": "ppo", "reward_model": str(Path(opts.reward).resolve()) if opts.reward else "a function",
                     "safety_reward_model": str(Path(opts.safety_reward).resolve()) if opts.safety_reward else None,
                     "safety_threshold": opts.safety_threshold if opts.safety_reward else None,
                     "kl_coef": opts.kl_coef, "ppo_epochs": opts.ppo_epochs, "ppo_samples": opts.ppo_samples, "gamma": opts.gamma, "lam": opts.lam,
                     "cliprange": opts.cliprange, "vf_coef": opts.vf_coef, "temperature": opts.temperature,
                     "top_p": opts.top_p, "max_new_tokens": opts.max_new_tokens, "sample_seed": opts.sample_seed,
                     "seq_len": seq_len, "held_out": opts.held_out, "split_seed": opts.split_seed,
                     "prompts": len(items), "prompts_left_out_too_long": too_long, "train_pairs": len(train_p),
                     "held_out_pairs": len(held_p), "data_sha256": sha256_file(Path(opts.data)),
                     "reference": "base model (LoRA adapters disabled)", "lora_r": lora_cfg.r,
                     "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "lora_targets": list(lora_cfg.targets)}
    card = dict(produced_by="llamaforge align --method ppo", base_model=base_name, args=model.args,
                method=f"align: PPO (KL coefficient {opts.kl_coef}, clip {opts.cliprange}, GAE γ={opts.gamma} "
                       f"λ={opts.lam}, {opts.ppo_epochs} epoch(s) per rollout) (LoRA r={lora_cfg.r})",
                license=ckpt.license, training_config=settings_card,
                data_files=data_files(opts, "; prompts of the train part only"))
    trainer = Trainer(model, cfg, source, None, export=export, card=card, ctx=ctx, started=started, objective=objective)
    summary = trainer.fit()
    summary.update(score=trainer._last("score"), kl=trainer._last("kl"), val_accuracy=None)
    ctx.close()
    return summary
