"""Alignment vs TRL on the bundled SmolLM2-135M (LoRA): reward-model held-out accuracy and DPO speed.

1. Reward model: `llamaforge align --method reward` (run_align) and TRL's RewardTrainer train the same
   base (the bundled GGUF dequantized to float32, given to TRL as an HF folder) on the same HH-RLHF
   harmless-base train split (llamaforge's fixed-seed 90/10 split), the same steps, batch, LoRA
   (r=16, alpha=32, all projections, the score head trained), AdamW(0.9, 0.95, eps 1e-5, no weight
   decay), peak lr with cosine decay to 10%, fp32, pairs up to --seq tokens; each is then scored on the
   held-out pairs that fit (pairwise accuracy: reward(chosen) > reward(rejected)).
2. DPO speed: one training step (reference forward with the adapters off, policy forward + backward,
   clip, AdamW) on the same --dpo-batch pairs, llamaforge's Trainer step vs TRL's DPOTrainer
   training_step + optimizer step, alternating repetitions after a warm-up; tokens = real (unpadded)
   tokens of the batch.

    .venv/bin/python bench/bench_align.py [--threads 1 --steps 30 --batch 8 --lr 2e-4 --seq 256 --dpo-batch 4 --reps 5]

3. Rejection sampling (`--rejection`, on its own): a reward model (`--reward DIR`, else one trained here for
   --steps steps), then `align --method rejection-sampling --sample-only` on the first --rs-prompts train
   prompts with --k answers each: mean reward of the best of K vs the policy's single sample, and the
   sampling time. Printed only (docs/alignment.md records the figures by hand).

    .venv/bin/python bench/bench_align.py --rejection [--steps 4 --batch 4 --rs-prompts 8 --k 4 --max-new 48]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reward_ours(base: Path, out: Path, a) -> dict:
    from llamaforge.options import build
    from llamaforge.train.align import run_align
    from llamaforge.train.configs import AlignConfig
    opts = build(AlignConfig, None, {
        "method": "reward", "model": str(base), "data": str(HH), "output": str(out), "seq_len": a.seq,
        "tune": "lora", "lora_r": 16, "lora_alpha": 32.0, "train.max_steps": a.steps, "train.micro_batch_size": a.batch,
        "train.grad_accum": 1, "train.lr": a.lr, "train.warmup_steps": 2, "train.weight_decay": 0.0,
        "train.eval_every": a.steps, "train.eval_batches": 1000, "train.save_every": 0, "train.precision": "fp32",
        "train.progress": False, "train.seed": 0})
    t = time.perf_counter()
    s = run_align(opts)
    steps = [r["elapsed_s"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    return {"accuracy": s["val_accuracy"], "train_s": steps[-1], "total_s": time.perf_counter() - t, "loss": s["loss"]}


def _fits(tok, msgs, seq) -> list[int] | None:
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids if len(ids) <= seq else None


def reward_trl(base: Path, out: Path, train_p, held_p, a) -> dict:
    import peft
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    tok = transformers.AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    ds = Dataset.from_list([{"chosen": p.chosen, "rejected": p.rejected} for p in train_p])
    cfg = RewardConfig(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch,
                       gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="cosine_with_min_lr",
                       lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=2, weight_decay=0.0, adam_beta1=0.9,
                       adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0, max_length=a.seq, logging_steps=10,
                       save_strategy="no", report_to="none", use_cpu=True, seed=0, bf16=False,
                       dataloader_num_workers=0, disable_tqdm=True)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS_HF, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
    t = time.perf_counter()
    res = trainer.train()
    train_s = time.perf_counter() - t
    m = trainer.model.eval()
    right = n = 0
    with torch.no_grad():
        for p in held_p:
            c, r = _fits(tok, p.chosen, a.seq), _fits(tok, p.rejected, a.seq)
            if c is None or r is None:
                continue
            sc, sr = (m(input_ids=torch.tensor([ids])).logits.item() for ids in (c, r))
            right, n = right + (sc > sr), n + 1
    return {"accuracy": right / n, "train_s": train_s, "total_s": time.perf_counter() - t, "loss": res.training_loss,
            "held_out": n}


def dpo_steps(base: Path, out: Path, pairs, a):
    """(our step, their step, our tokens, their tokens) on the same pairs."""
    import peft
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from llamaforge.lora import LoraConfig, apply_lora
    from llamaforge.train.commands import load_base
    from llamaforge.train.pairs import PairSource, render_pairs
    from llamaforge.train.preference import DPOObjective
    from llamaforge.train.trainer import TrainConfig, Trainer

    model, ck = load_base(str(base))
    rows = render_pairs(pairs, ck.tokenizer, ck.chat_template, a.seq)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=16, alpha=32))
    src = PairSource(rows, seed=0, pad_id=ck.tokenizer.pad_id or 0)
    ours = Trainer(model, TrainConfig(output=str(out / "ours"), max_steps=10_000, micro_batch_size=len(pairs), lr=1e-5,
                                      warmup_steps=0, weight_decay=0.0, eval_every=0, progress=False, precision="fp32"),
                   src, objective=DPOObjective(model, beta=0.1, reference="adapters"))
    our_tokens = int(src.batch(list(range(len(pairs))))[2].sum())

    def our_step():
        ours._train_step()
        ours.step += 1

    tok = transformers.AutoTokenizer.from_pretrained(base)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": p.chosen[:-1], "chosen": p.chosen[-1:], "rejected": p.rejected[-1:]} for p in pairs])
    cfg = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=len(pairs), learning_rate=1e-5,
                    max_length=a.seq, beta=0.1, use_cpu=True, report_to="none", bf16=False, save_strategy="no",
                    weight_decay=0.0, adam_beta2=0.95, adam_epsilon=1e-5, disable_tqdm=True)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS_HF, task_type="CAUSAL_LM")
    trl = DPOTrainer(model=hf_model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
    opt = trl.create_optimizer()
    trl.current_gradient_accumulation_steps = 1   # set by Trainer.train's loop, which is not used here
    batch = trl._prepare_inputs(trl.data_collator([trl.train_dataset[i] for i in range(len(pairs))]))
    their_tokens = int(batch["attention_mask"].sum())
    params = [p for p in trl.model.parameters() if p.requires_grad]

    def their_step():
        trl.model.train()
        trl.training_step(trl.model, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return our_step, their_step, our_tokens, their_tokens


def _band(n: int) -> float:
    return 2 * (0.25 / n) ** 0.5


def _rendered_len(pair, ck) -> int:
    from llamaforge.train.data import render_example
    return max(len(render_example(ck.tokenizer, m, ck.chat_template)[0]) for m in (pair.chosen, pair.rejected))


def rejection(base: Path, tmp: Path, a) -> int:
    """Best-of-K vs one sample on the bundled policy (sample only), with a reward model trained here or given."""
    from llamaforge.options import build
    from llamaforge.train.align import run_align
    from llamaforge.train.configs import AlignConfig
    rm = Path(a.reward) if a.reward else tmp / "rm"
    rm_line = f"reward model {a.reward}"
    if not a.reward:
        r = reward_ours(base, rm, a)
        rm_line = (f"reward model trained here: {a.steps} steps of {a.batch} pairs, lr {a.lr:g}, LoRA r=16 "
                   f"(held-out pairwise accuracy {r['accuracy']:.3f}, {r['total_s']:.0f} s)")
        print(rm_line, flush=True)
    opts = build(AlignConfig, None, {
        "method": "rejection-sampling", "model": str(base), "data": str(HH), "output": str(tmp / "rs"),
        "reward": str(rm), "seq_len": a.seq + a.max_new, "k": a.k, "temperature": a.temperature,
        "max_new_tokens": a.max_new, "gen_batch": a.gen_batch, "num_prompts": a.rs_prompts, "sample_only": True,
        "train.progress": False})
    t = time.perf_counter()
    s = run_align(opts)
    secs = time.perf_counter() - t
    body = ["## Rejection sampling (`bench/bench_align.py --rejection`)", "",
            f"SmolLM2-135M-Instruct (bundled GGUF dequantized to float32) as the policy; {rm_line}; the first "
            f"{s['records']} HH-RLHF harmless-base train-split prompts (up to {a.seq} tokens), {a.k} answers each "
            f"(temperature {a.temperature:g}, up to {a.max_new} new tokens, {a.gen_batch} sequences per batch), "
            f"{a.threads} torch thread(s).", "",
            "| answer kept | mean reward |", "|---|---|",
            f"| best of {a.k} | **{s['mean_reward_best_of_k']:.4f}** |",
            f"| single sample (the first of each {a.k}) | {s['mean_reward_single_sample']:.4f} |",
            f"| mean over all samples | {s['mean_reward_all_samples']:.4f} |", "",
            f"Gain of best-of-{a.k} over one sample: {s['gain_over_single_sample']:+.4f}; sampling and scoring took "
            f"{secs:.0f} s ({secs / max(1, s['records']):.1f} s per prompt, {a.k} answers each).", "", machine_line(), "",
            f"Command: `.venv/bin/python bench/bench_align.py --rejection --threads {a.threads} --steps {a.steps} "
            f"--batch {a.batch} --lr {a.lr:g} --seq {a.seq} --rs-prompts {a.rs_prompts} --k {a.k} --max-new {a.max_new}"
            f"{' --reward ' + a.reward if a.reward else ''}`"]
    print("\n".join(body))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="pairs per reward-model step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seq", type=int, default=256, help="longest conversation in tokens (longer pairs left out)")
    ap.add_argument("--dpo-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 OpenMP threads spin against other jobs)")
    ap.add_argument("--skip-reward", action="store_true")
    ap.add_argument("--held-limit", type=int, default=None, help="score only the first N held-out pairs with TRL (smoke runs)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--rejection", action="store_true", help="run the rejection-sampling benchmark (only)")
    ap.add_argument("--reward", default=None, help="--rejection: reward model folder (default: train one for --steps)")
    ap.add_argument("--rs-prompts", type=int, default=8, help="--rejection: train prompts to sample for")
    ap.add_argument("--k", type=int, default=4, help="--rejection: answers per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new", type=int, default=48, help="--rejection: longest answer in tokens")
    ap.add_argument("--gen-batch", type=int, default=16, help="--rejection: sequences decoded together")
    a = ap.parse_args()
    if not HH.is_file():
        sys.exit(f"{HH} not found")
    torch.set_num_threads(a.threads)
    from llamaforge.formats import hf
    from llamaforge.train.commands import load_base
    from llamaforge.train.pairs import read_preference_jsonl, split_held_out
    pairs = read_preference_jsonl(HH)
    train_p, held_p = split_held_out(pairs, 0.1, 0)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model, ck = load_base(None)
        hf.write(tmp / "base", model.args, dict(model.state_dict()), tokenizer=ck.tokenizer, chat_template=ck.chat_template)
        del model
        if a.rejection:
            return rejection(tmp / "base", tmp, a)
        rm = None
        if not a.skip_reward:
            ours = reward_ours(tmp / "base", tmp / "ours_rm", a)
            print("llamaforge reward model:", ours, flush=True)
            theirs = reward_trl(tmp / "base", tmp / "trl_rm", train_p, held_p[:a.held_limit], a)
            print("TRL reward model:", theirs, flush=True)
            rm = (ours, theirs)
        chosen = []  # the first --dpo-batch training pairs that fit
        for p in train_p:
            if len(chosen) < a.dpo_batch and _rendered_len(p, ck) <= a.seq:
                chosen.append(p)
        our_step, their_step, our_tok, their_tok = dpo_steps(tmp / "base", tmp, chosen, a)
        our_step(), their_step()   # warm-up
        times = {"llamaforge": [], "TRL": []}
        for _ in range(a.reps):
            for name, fn in (("llamaforge", our_step), ("TRL", their_step)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {"llamaforge": our_tok / med["llamaforge"], "TRL": their_tok / med["TRL"]}
    body = [f"## Alignment vs TRL (`bench/bench_align.py`)", "",
            "SmolLM2-135M (bundled GGUF dequantized to float32; TRL gets the same weights as an HF folder), LoRA r=16 "
            "alpha=32 on q,k,v,o,gate,up,down, fp32, Anthropic HH-RLHF harmless-base (2,312 pairs) split by "
            "llamaforge's fixed seed into 2,081 train / 231 held-out pairs, pairs up to "
            f"{a.seq} tokens; TRL {__import__('trl').__version__}; {a.threads} torch thread(s), both sides in one process.", ""]
    if rm:
        ours, theirs = rm
        body += [f"Reward model: {a.steps} steps of {a.batch} pairs, lr {a.lr:g} (2 warm-up steps, cosine to 10%), "
                 "AdamW(0.9, 0.95, eps 1e-5, no weight decay), then pairwise accuracy on the held-out pairs that fit "
                 f"({theirs['held_out']}).", "",
                 "| trainer | held-out pairwise accuracy | train loss | training loop | with data preparation, held-out "
                 "scoring, saving |", "|---|---|---|---|---|",
                 f"| llamaforge `align --method reward` | **{ours['accuracy']:.3f}** | {ours['loss']:.4f} (last step) | "
                 f"{ours['train_s']:.0f} s | {ours['total_s']:.0f} s |",
                 f"| TRL RewardTrainer | **{theirs['accuracy']:.3f}** | {theirs['loss']:.4f} (mean of the run) | "
                 f"{theirs['train_s']:.0f} s | {theirs['total_s']:.0f} s |", "",
                 f"{a.steps * a.batch} training pairs seen; on {theirs['held_out']} held-out pairs a coin flip lands in "
                 f"{0.5 - _band(theirs['held_out']):.3f}-{0.5 + _band(theirs['held_out']):.3f} (two standard errors), so "
                 "accuracies inside that band say nothing about either trainer.", ""]
    body += [f"DPO (sigmoid, beta 0.1, reference = adapters off): one training step on the same {a.dpo_batch} pairs "
             f"({our_tok} real tokens in llamaforge's rendering, {their_tok} in TRL's), median of {a.reps} "
             "alternating steps after one warm-up.", "",
             "| trainer | s/step | tokens/s |", "|---|---|---|",
             f"| llamaforge | {med['llamaforge']:.2f} | {tps['llamaforge']:.0f} |",
             f"| TRL DPOTrainer | {med['TRL']:.2f} | {tps['TRL']:.0f} |", "",
             f"llamaforge / TRL = **{tps['llamaforge'] / tps['TRL']:.2f}x** (tokens/s).", "", machine_line(), "",
             f"Command: `.venv/bin/python bench/bench_align.py --threads {a.threads} --steps {a.steps} --batch {a.batch} --lr {a.lr:g} "
             f"--seq {a.seq} --dpo-batch {a.dpo_batch} --reps {a.reps}`"]
    text = "\n".join(body)
    print(text)
    if not a.no_write:
        update_section("align", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
