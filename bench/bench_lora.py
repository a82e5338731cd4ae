"""LoRA training throughput: llamaforge's trainer step vs transformers + peft, same model, batch, sequence length.

Both sides train the bundled SmolLM2-135M (dequantized to float32, the same weights: llamaforge's are
written as an HF folder that transformers loads) with LoRA r=16, alpha=32 on q,k,v,o,gate,up,down,
AdamW, every token a target. A timed step = forward + backward + clip + optimizer step. The two
sides alternate repetitions in one process; the table reports medians.

    nice .venv/bin/python bench/bench_lora.py [--batch 4 --seq 256 --reps 5 --precision fp32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, update_section  # noqa: E402

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours(model, batch: torch.Tensor, precision: str):
    from llamaforge.lora import LoraConfig, apply_lora
    from llamaforge.train.trainer import LossModule
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=16, alpha=32))
    module = LossModule(model).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    mask = torch.ones_like(batch, dtype=torch.bool)
    n = int(mask[:, 1:].sum())

    return _train_step(lambda: module(batch, mask) / n, params, opt, precision)


def theirs(hf_dir: Path, batch: torch.Tensor, precision: str):
    import peft
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS_HF))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)

    return _train_step(lambda: model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss, params, opt, precision)


def _train_step(compute_loss, params, opt, precision: str):
    """One timed step, the same for both sides: forward (autocast if bf16), backward, clip, AdamW."""
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = compute_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled SmolLM2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = ap.parse_args()

    from llamaforge.formats import hf
    from llamaforge.train.commands import load_base
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, ck = load_base(a.model)
        batch = torch.randint(0, base.args.vocab_size, (a.batch, a.seq + 1), generator=g)
        # transformers gets the very same float32 weights, through an HF folder
        hf.write(tmp, base.args, dict(base.state_dict()), tokenizer=ck.tokenizer)
        our_step = ours(base, batch, a.precision)
        their_step = theirs(Path(tmp), batch, a.precision)
        l0, l1 = our_step(), their_step()   # warm-up (and a sanity check: same weights, same initial loss)
        times = {"llamaforge": [], "transformers+peft": []}
        for _ in range(a.reps):
            for name, fn in (("llamaforge", our_step), ("transformers+peft", their_step)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    tokens = a.batch * a.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    ratio = tps["llamaforge"] / tps["transformers+peft"]
    rows = "\n".join(f"| {k} | {med[k]:.2f} | {tps[k]:.0f} |" for k in times)
    body = f"""## LoRA training throughput (`bench/bench_lora.py`)

SmolLM2-135M (bundled GGUF dequantized to float32), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, AdamW,
batch {a.batch} x {a.seq} tokens, {a.precision}, median of {a.reps} alternating steps after one warm-up
(initial losses: llamaforge {l0:.4f}, transformers+peft {l1:.4f}).

| trainer | s/step | tokens/s |
|---|---|---|
{rows}

llamaforge / transformers+peft = **{ratio:.2f}x**.

{machine_line()}

Command: `nice .venv/bin/python bench/bench_lora.py --batch {a.batch} --seq {a.seq} --reps {a.reps} --precision {a.precision}`
"""
    print(body)
    if not a.no_write:
        update_section("lora", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
