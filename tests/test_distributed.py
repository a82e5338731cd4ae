"""torchrun: a 2-process CPU run (gloo) with the same global batch follows the 1-process loss curve.

Tolerance: losses agree to a relative 1e-4 (the gradient all-reduce sums in a different order than
one process's accumulation, so bit equality is not expected; the observed gap is ~1e-6).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamaforge.train import data as D

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    d = tmp_path_factory.mktemp("dist")
    corpus = d / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    tok = D.train_sentencepiece([corpus], d / "tok", vocab_size=384)
    D.pretokenize_files([corpus], tok, d / "shards", val_fraction=0.1, progress=False)
    return d


def _run(cmd: list[str], timeout: float = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _pretrain_args(d: Path, out: str, micro: int, accum: int, strategy: str) -> list[str]:
    return ["pretrain", "--tokenizer", str(d / "tok"), "--data", str(d / "shards"), "--output", str(d / out),
            "--train.max-steps", "4", "--train.micro-batch-size", str(micro), "--train.grad-accum", str(accum),
            "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1",
            "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.eval-every", "2", "--train.eval-batches", "2",
            "--train.save-every", "0", "--train.precision", "fp32", "--sample-tokens", "0", "--no-train.progress",
            "--train.strategy", strategy]


def _curve(path: Path) -> tuple[list[float], list[float]]:
    recs = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_curve(prepared, strategy):
    d = prepared
    single = d / "single"
    if not (single / "train_log.jsonl").exists():  # shared by both strategies: 1 process, micro 2 x accum 2
        r = _run([sys.executable, "-m", "llamaforge.cli", *_pretrain_args(d, "single", 2, 2, "ddp")])
        assert r.returncode == 0, r.stderr[-3000:]
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "llamaforge.cli", *_pretrain_args(d, f"two-{strategy}", 2, 1, strategy)])
    assert r.returncode == 0, r.stderr[-3000:]
    loss1, val1 = _curve(single)
    loss2, val2 = _curve(d / f"two-{strategy}")
    assert len(loss1) == len(loss2) == 4 and len(val1) == len(val2) == 2
    np.testing.assert_allclose(loss2, loss1, rtol=TOLERANCE)
    np.testing.assert_allclose(val2, val1, rtol=TOLERANCE)
    assert loss1[-1] < loss1[0]
    state = json.loads(next((d / f"two-{strategy}" / "checkpoints").glob("step-*/trainer_state/state.json")).read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4
    assert (d / f"two-{strategy}" / "model.safetensors").is_file()   # rank 0 wrote the gathered model
