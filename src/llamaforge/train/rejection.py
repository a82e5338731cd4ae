"""Rejection sampling (Llama 2 paper §3.2.3) and Ghost Attention data (§3.3): SFT data sampled from a policy.

Rejection sampling: for each prompt, K answers are sampled from the policy (decoded together in one
``generate.Batch``; the K copies of a prompt share its prefill), each is scored by a reward model and
the best is kept. The result is a JSONL that ``llamaforge finetune`` reads:

    {"messages": [...prompt..., {"role": "assistant", "content": BEST}], "reward": r_best,
     "rewards": [r_1, ..., r_K], "prompt_index": i}

Ghost Attention: a multi-turn dialogue's user turns, an instruction from ``GATT_INSTRUCTIONS`` (or
the caller's list) attached to every user turn while the answers are sampled turn by turn (best of K
per turn when a reward model is given), then the training record keeps the instruction in the first
user turn only and gives every earlier assistant reply ``"weight": 0`` (no loss; OpenAI's fine-tuning
convention, read by ``data.render_example``), so only the last reply is trained.

Every answer's sampling seed is a function of (seed, item, turn, sample): results do not depend on
how items are batched, and a run stopped part-way resumes from ``samples.partial.jsonl``, chunk by chunk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import ChatFormatError, encode_chat
from ..fileio import atomic_write_text
from ..generate import Batch
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
PARTIAL_FILE = "samples.partial.jsonl"
SUMMARY_FILE = "rejection_summary.json"

# System-style instructions for Ghost Attention, after the paper's kinds (language, persona, style).
GATT_INSTRUCTIONS = (
    "Always answer as a pirate.",
    "Answer in French.",
    "Answer in Spanish.",
    "Act as Napoleon.",
    "Answer in at most two sentences.",
    "Always answer with a haiku.",
    "Answer as a cheerful children's teacher.",
    "Use only formal, polite English.",
)


@dataclass(frozen=True)
class SampleSettings:
    """How answers are sampled: K per prompt (or per turn), temperature, nucleus, length and seed."""
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    gen_batch: int = 16      # sequences decoding together (prompts per batch = gen_batch // k, at least 1)

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"k (samples per prompt) must be >= 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.gen_batch < 1:
            raise ValueError(f"gen_batch must be >= 1, got {self.gen_batch}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # its own range checks

    @property
    def prompts_per_batch(self) -> int:
        return max(1, self.gen_batch // self.k)


def sample_seed(seed: int, *key: int) -> int:
    """A 62-bit sampling seed for one answer, a pure function of (seed, item, turn, sample)."""
    return int(np.random.default_rng([seed, 2, *key]).integers(0, 2 ** 62))


class Policy:
    """A model to sample answers from, with its tokenizer and chat format."""

    def __init__(self, model, tokenizer, template: str | None, settings: SampleSettings, *, max_seq: int | None = None):
        settings.validate()
        self.model, self.tok, self.template, self.s = model.eval(), tokenizer, template, settings
        self.max_seq = min(max_seq or model.args.max_seq_len, model.args.max_seq_len)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tok, messages, self.template)

    def fits(self, messages: list[dict[str, str]]) -> bool:
        """Whether the prompt leaves room for max_new_tokens in the context (else it is left out)."""
        try:
            return len(self.prompt_ids(messages)) + self.s.max_new_tokens <= self.max_seq
        except ChatFormatError:
            return False

    @torch.inference_mode()
    def generate(self, ids: Sequence[list[int]], seeds: Sequence[int]) -> list:
        """One sampled generation.Sequence per (prompt ids, seed), all decoded in one Batch with prefix
        reuse (copies of one prompt share its prefill)."""
        s = self.s
        need = max(len(p) for p in ids) + s.max_new_tokens
        batch = Batch(self.model, self.tok, max_batch=len(ids), max_seq=min(need, self.max_seq), prefix_reuse=True)
        seqs = [batch.add(p, SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                            seed=seed)) for p, seed in zip(ids, seeds)]
        while any(not q.finish_reason for q in seqs):
            for _, ev in batch.step():
                if ev.error is not None:
                    raise ev.error
        return seqs

    def answers(self, contexts: Sequence[list[dict[str, str]]], keys: Sequence[tuple[int, ...]]) -> list[list[str]]:
        """K sampled answers for each context (a conversation ending with a user turn); keys[i]
        seeds context i's samples."""
        k = self.s.k
        ids = [self.prompt_ids(c) for c in contexts for _ in range(k)]
        seeds = [sample_seed(self.s.seed, *key, j) for key in keys for j in range(k)]
        texts = [q.stream.text.strip() for q in self.generate(ids, seeds)]
        return [texts[i * k:(i + 1) * k] for i in range(len(contexts))]


Scorer = Callable[[list[list[dict[str, str]]]], list[float]]


def best_answers(policy: Policy, contexts: list[list[dict[str, str]]], keys: list[tuple[int, ...]],
                 score: Scorer | None) -> list[tuple[str, list[str], list[float] | None]]:
    """(best answer, all K answers, their rewards) per context; without a scorer K must be 1."""
    if score is None and policy.s.k > 1:
        raise ValueError("best of K > 1 needs a reward model (--reward DIR)")
    out = []
    for ctx, answers in zip(contexts, policy.answers(contexts, keys)):
        if score is None:
            out.append((answers[0], answers, None))
            continue
        rewards = [float(r) for r in score([ctx + [{"role": "assistant", "content": a}] for a in answers])]
        out.append((answers[int(np.argmax(rewards))], answers, rewards))
    return out


# ---------------------------------------------------------------- the two data builders

def rejection_records(policy: Policy, prompts: Sequence[tuple[int, list[dict[str, str]]]], score: Scorer,
                      ) -> list[dict]:
    """Best-of-K SFT records for (prompt index, prompt messages) items."""
    picked = best_answers(policy, [p for _, p in prompts], [(i, 0) for i, _ in prompts], score)
    return [{"messages": p + [{"role": "assistant", "content": best}], "reward": max(rewards), "rewards": rewards,
             "prompt_index": i}
            for (i, p), (best, _, rewards) in zip(prompts, picked)]


def with_instruction(instruction: str, text: str) -> str:
    """A user turn with the Ghost Attention instruction attached (before the message)."""
    return f"{instruction}\n\n{text}"


def pick_instruction(instructions: Sequence[str], seed: int, index: int) -> str:
    return instructions[int(np.random.default_rng([seed, 5, index]).integers(len(instructions)))]


def gatt_records(policy: Policy, dialogues: Sequence[tuple[int, list[str]]], score: Scorer | None,
                 instructions: Sequence[str] = GATT_INSTRUCTIONS) -> list[dict]:
    """Ghost Attention records for (dialogue index, user turns) items.

    Sampling sees the instruction on every user turn; the record keeps it on the first only, and
    every assistant reply but the last has weight 0 (the loss is on the last reply only).
    """
    if not instructions:
        raise ValueError("Ghost Attention needs at least one instruction")
    inst = [pick_instruction(instructions, policy.s.seed, i) for i, _ in dialogues]
    contexts: list[list[dict[str, str]]] = [[] for _ in dialogues]
    replies: list[list[str]] = [[] for _ in dialogues]
    rewards: list[list[float | None]] = [[] for _ in dialogues]
    for turn in range(max(len(u) for _, u in dialogues)):
        live = [d for d, (_, users) in enumerate(dialogues) if turn < len(users)]
        for d in live:
            contexts[d].append({"role": "user", "content": with_instruction(inst[d], dialogues[d][1][turn])})
        picked = best_answers(policy, [contexts[d] for d in live], [(dialogues[d][0], turn) for d in live], score)
        for d, (best, _, rs) in zip(live, picked):
            contexts[d].append({"role": "assistant", "content": best})
            replies[d].append(best)
            rewards[d].append(None if rs is None else max(rs))
    out = []
    for d, (i, users) in enumerate(dialogues):
        msgs: list[dict] = []
        for t, (u, a) in enumerate(zip(users, replies[d])):
            msgs.append({"role": "user", "content": with_instruction(inst[d], u) if t == 0 else u})
            msgs.append({"role": "assistant", "content": a, **({} if t == len(users) - 1 else {"weight": 0})})
        out.append({"messages": msgs, "instruction": inst[d], "rewards": rewards[d], "prompt_index": i})
    return out


# ---------------------------------------------------------------- chunked, resumable runs

def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_chunks(items: Sequence[tuple[int, object]], build: Callable[[list], list[dict]], chunk: int, partial: Path,
               key: str, *, progress: bool = False, desc: str = "sample") -> list[dict]:
    """build(items[c:c+chunk]) for every chunk, each chunk's records appended to ``partial`` as it
    finishes (one write, flushed and synced); a chunk already there under the same key is not redone."""
    done = _read_partial(partial, key)
    if not done:
        atomic_write_text(partial, json.dumps({"fingerprint": key}) + "\n")
    out: list[dict] = []
    with tqdm(total=len(items), desc=desc, unit="prompt", disable=not progress) as bar:
        for c in range(0, len(items), chunk):
            part = list(items[c:c + chunk])
            have = [done.get(i) for i, _ in part]
            if all(r is not None for r in have):
                recs = have
            else:
                recs = build(part)
                with open(partial, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                    f.flush()
                    os.fsync(f.fileno())
            out += recs
            bar.update(len(part))
    return out


def _read_partial(path: Path, key: str) -> dict[int, dict]:
    """Records of a previous run with the same settings, by prompt index (a line cut by a kill is skipped)."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except ValueError:
        head = {}
    if head.get("fingerprint") != key:
        log.warning("%s was written with other settings: sampling again", path)
        return {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        done[int(rec["prompt_index"])] = rec
    return done


def summarise(records: Sequence[dict], ghost: bool) -> dict:
    """Mean reward of the kept (best-of-K) answers vs the policy's single sample (the first of each K,
    a plain sample) and vs all samples (the expected reward of one sample)."""
    if ghost:
        best = [r for rec in records for r in rec["rewards"] if r is not None]
        return {"records": len(records), "turns": sum(len(rec["rewards"]) for rec in records),
                **({"mean_reward_best_of_k": float(np.mean(best))} if best else {})}
    best = [rec["reward"] for rec in records]
    first = [rec["rewards"][0] for rec in records]
    every = [r for rec in records for r in rec["rewards"]]
    return {"records": len(records), "mean_reward_best_of_k": float(np.mean(best)),
            "mean_reward_single_sample": float(np.mean(first)), "mean_reward_all_samples": float(np.mean(every)),
            "gain_over_single_sample": float(np.mean(best) - np.mean(first)),
            "best_is_first_sample": float(np.mean([int(np.argmax(rec["rewards"])) == 0 for rec in records]))}


# ---------------------------------------------------------------- the align method

def train_prompts(pairs, policy: Policy) -> tuple[list[tuple[int, list[dict[str, str]]]], int]:
    """(index, prompt) of each distinct prompt (a pair's turns before its last reply) that fits, and
    how many were left out for length."""
    seen, out, too_long = set(), [], 0
    for pair in pairs:
        prompt = pair.chosen[:-1]
        key = json.dumps(prompt)
        if key in seen:
            continue
        seen.add(key)
        if policy.fits(prompt):
            out.append((len(seen) - 1, prompt))
        else:
            too_long += 1
    return out, too_long


def gatt_dialogues(pairs, policy: Policy, turns: int, instructions: Sequence[str]) -> tuple[list, int]:
    """(index, user turns) of each distinct conversation with at least 2 user turns (cut to `turns`),
    left out when the instruction-carrying prompt plus an answer per turn may not fit."""
    if turns < 2:
        raise ValueError(f"gatt_turns must be >= 2 (Ghost Attention is about later turns), got {turns}")
    longest = max(instructions, key=len)
    seen, out, too_long = set(), [], 0
    for pair in pairs:
        users = [m["content"] for m in pair.chosen if m["role"] == "user"][:turns]
        key = json.dumps(users)
        if len(users) < 2 or key in seen:
            continue
        seen.add(key)
        msgs = []
        for u in users:
            msgs += [{"role": "user", "content": with_instruction(longest, u)}, {"role": "assistant", "content": ""}]
        try:
            n = len(policy.prompt_ids(msgs[:-1])) + len(users) * policy.s.max_new_tokens
        except ChatFormatError:
            n = policy.max_seq + 1
        if n <= policy.max_seq:
            out.append((len(seen) - 1, users))
        else:
            too_long += 1
    return out, too_long


def run_rejection(opts) -> dict:
    """`align --method rejection-sampling`: sample best-of-K (or Ghost Attention) data from the train
    split's prompts into OUTPUT/samples.jsonl, then fine-tune on it with `finetune` (unless sample_only)."""
    import gc
    from ..cards import sha256_file, write_model_card
    from .align_inputs import data_files as align_data_files, split_and_base, train_config
    from .commands import run_finetune
    from .configs import FinetuneConfig
    from .reward import Reward

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("rejection sampling runs in one process: start it without torchrun")
    if not opts.reward and (opts.k > 1 or not opts.ghost_attention):
        raise ValueError("--method rejection-sampling needs a reward model to pick the best of K: --reward DIR "
                         "(train one with --method reward)")
    settings = SampleSettings(k=int(opts.k), temperature=float(opts.temperature), top_p=float(opts.top_p),
                              max_new_tokens=int(opts.max_new_tokens), seed=int(opts.sample_seed),
                              gen_batch=int(opts.gen_batch))
    settings.validate()
    instructions = list(opts.gatt_instructions or GATT_INSTRUCTIONS)
    if opts.reward and not Path(opts.reward).is_dir():
        raise FileNotFoundError(f"{opts.reward}: reward model folder not found")
    out = Path(opts.output)
    train_p, held_p, model, ckpt, template, seq_len = split_and_base(opts)
    policy = Policy(model, ckpt.tokenizer, template, settings, max_seq=seq_len)
    if opts.ghost_attention:
        items, too_long = gatt_dialogues(train_p, policy, int(opts.gatt_turns), instructions)
    else:
        items, too_long = train_prompts(train_p, policy)
    items = items[:opts.num_prompts] if opts.num_prompts is not None else items
    if not items:
        raise ValueError(f"{opts.data}: no {'multi-turn dialogue' if opts.ghost_attention else 'prompt'} of the train "
                         f"split fits in seq_len {seq_len} with max_new_tokens {settings.max_new_tokens}")
    rm = Reward.load(opts.reward) if opts.reward else None
    score = (lambda convs: rm.score(convs, batch_size=settings.gen_batch)) if rm else None
    base_name = str(ckpt.path) if ckpt.path else str(opts.model)
    run = {"method": "ghost-attention" if opts.ghost_attention else "rejection-sampling", "policy": base_name,
           "reward_model": str(Path(opts.reward).resolve()) if opts.reward else None, **asdict(settings),
           "seq_len": seq_len, "held_out": opts.held_out, "split_seed": opts.split_seed,
           "data_sha256": sha256_file(Path(opts.data)), "items": len(items), "left_out_too_long": too_long,
           "train_pairs": len(train_p), "held_out_pairs": len(held_p),
           **({"gatt_turns": int(opts.gatt_turns), "gatt_instructions": instructions} if opts.ghost_attention else {})}
    out.mkdir(parents=True, exist_ok=True)
    if opts.ghost_attention:
        build = lambda part: gatt_records(policy, part, score, instructions)  # noqa: E731
    else:
        build = lambda part: rejection_records(policy, part, score)  # noqa: E731
    samples = out / SAMPLES_FILE
    records = _finished(out, run)
    if records is None:
        records = run_chunks(items, build, settings.prompts_per_batch, out / PARTIAL_FILE, fingerprint(run),
                             progress=bool(opts.train.progress),
                             desc="ghost attention" if opts.ghost_attention else "best of K")
        stats = summarise(records, bool(opts.ghost_attention))
        atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(out / SUMMARY_FILE, json.dumps({**stats, "settings": run}, indent=2) + "\n")  # last: complete
        (out / PARTIAL_FILE).unlink(missing_ok=True)
    stats = summarise(records, bool(opts.ghost_attention))
    print(_report_line(stats, settings.k), flush=True)
    method = (f"align: Ghost Attention data ({settings.k} sample(s) per turn" if opts.ghost_attention
              else f"align: rejection sampling (best of {settings.k} by the reward model") + \
        f", temperature {settings.temperature})"
    data_files = align_data_files(opts, "; prompts of the train part only")
    card = dict(produced_by="llamaforge align --method rejection-sampling", method=method, eval_results=stats,
                license=ckpt.license)
    if opts.sample_only:
        write_model_card(out, base_model=base_name, args=model.args, data_files=data_files + [
            {"path": str(samples), "role": "output"}], training_config=run, **card)
        return {**stats, "output": str(out), "samples": str(samples), "step": 0}
    del policy, model, rm, score
    gc.collect()
    ft = FinetuneConfig(model=opts.model, data=str(samples), method=opts.tune, output=str(out), seq_len=seq_len,
                        lora_r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        lora_targets=list(opts.lora_targets), train=train_config(opts))
    summary = run_finetune(ft, card_update={**card, "data_files": data_files + [{"path": str(samples), "role": "tune"}],
                                            "training_config": {"rejection_sampling": run}})
    return {**summary, **stats, "samples": str(samples)}


def _finished(out: Path, run: dict) -> list[dict] | None:
    """The records of a finished sampling pass with these very settings (a resumed run fine-tunes on them)."""
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        if json.loads(json.dumps(run)) != summary.get("settings"):
            return None
        return [json.loads(line) for line in (out / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return None


def _report_line(stats: dict, k: int) -> str:
    if "mean_reward_single_sample" not in stats:
        best = stats.get("mean_reward_best_of_k")
        return f"ghost attention: {stats['records']} dialogues, {stats['turns']} sampled turns" + (
            f", mean reward of the kept answers {best:.4f}" if best is not None else "")
    return (f"rejection sampling: {stats['records']} prompts, mean reward best-of-{k} "
            f"{stats['mean_reward_best_of_k']:.4f} vs single sample {stats['mean_reward_single_sample']:.4f} "
            f"(all samples {stats['mean_reward_all_samples']:.4f}; gain {stats['gain_over_single_sample']:+.4f})")
