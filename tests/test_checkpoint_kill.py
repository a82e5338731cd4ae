"""Checkpoints survive SIGKILL at any moment (issue 14 item 6).

A helper process imports torch and llamaforge once, then forks one trainer child per kill point. Each
child counts its file-system operations (torch.save, os.replace, os.unlink, os.rmdir, os.mkdir,
shutil.copyfile) and SIGKILLs itself just before the k-th one, so every boundary between two of them
in a checkpoint save is hit, with no timing luck: the writes of a new step, the swap, the pruning of
the old step (--keep-checkpoints 1), and a re-save of the same step by a run that had nothing left to
do. After each kill a fresh child resumes; it must start from the newest complete checkpoint (never
from 0 while a complete copy exists) and end bit for bit where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

HELPER = textwrap.dedent('''
    import json, os, shutil, signal, sys, traceback
    from pathlib import Path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported once here, not in every child
    import torch
    import torch._dynamo  # noqa: F401 - the optimizer imports it lazily: once here, not in every child
    from llamaforge.config import preset
    from llamaforge.model import Transformer
    from llamaforge.train.trainer import STATE_DIR, TrainConfig, Trainer

    STEPS = 2
    OPS = [(torch, "save"), (os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
           (shutil, "copyfile")]

    class Rows:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.tokens = torch.randint(0, 256, (64, 17), generator=g)
            self.mask = torch.rand((64, 17), generator=g) > 0.3
        def __len__(self):
            return 64
        def batch(self, indices):
            idx = [i % 64 for i in indices]
            return self.tokens[idx], self.mask[idx]

    def child(out, kill_at, report):
        torch.set_num_threads(1)
        count, ops = [0], []
        for owner, name in OPS:
            real = getattr(owner, name)
            def op(*a, _real=real, _name=name, **k):
                count[0] += 1
                path = next((str(x) for x in a if isinstance(x, (str, os.PathLike))), "")
                ops.append(f"{_name} {path[len(out):] if path.startswith(out) else path}")
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(*a, **k)
            setattr(owner, name, op)
        cfg = TrainConfig(output=out, max_steps=STEPS, micro_batch_size=2, lr=1e-2, warmup_steps=1, save_every=1,
                          keep_checkpoints=1, eval_every=0, progress=False, precision="fp32")
        model = Transformer(preset("tiny")).init_weights(0)
        trainer = Trainer(model, cfg, Rows())
        resume = trainer._try_resume
        def recorded_resume():
            resume()
            ops.append(f"resumed at {trainer.step}")
        trainer._try_resume = recorded_resume
        trainer.fit()
        with open(report, "w") as f:
            json.dump(ops, f)

    def run(out, kill_at=0, report=os.devnull):
        pid = os.fork()
        if pid == 0:
            try:
                child(out, kill_at, report)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else os.waitstatus_to_exitcode(status)

    def final_state(out):
        """Bytes that must be identical to an uninterrupted run's: trained tensors, optimizer, losses."""
        ck = Path(out) / "checkpoints" / f"step-{STEPS:06d}" / STATE_DIR
        model = torch.load(ck / "model.pt", weights_only=True)
        optim = torch.load(ck / "optimizer.pt", weights_only=True)
        losses = [json.loads(l)["loss"] for l in (Path(out) / "train_log.jsonl").read_text().splitlines()]
        return model, optim, losses

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):  # torch's optimizer state round trip turns betas into a list
            return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    def main(tmp, scenario, kills):
        tmp = Path(tmp)
        ref = str(tmp / "ref")
        assert run(ref) == 0
        want = final_state(ref)
        results = {}
        for k in kills:
            out = str(tmp / f"{scenario}-{k}")
            if scenario == "resave":           # a finished run, started again: it re-saves its last step
                shutil.copytree(ref, out)
            status = run(out, kill_at=k)
            report = str(tmp / f"report-{scenario}-{k}.json")
            resumed = run(out, report=report)
            ops = json.load(open(report)) if resumed == 0 else []
            leftovers = sorted(p.name for p in (Path(out) / "checkpoints").iterdir()) if resumed == 0 else []
            results[k] = {"status": status, "resumed": resumed, "resumed_at": next((o for o in ops if o.startswith("resumed")), None),
                          "same": resumed == 0 and same(final_state(out), want), "checkpoints": leftovers}
        print(json.dumps(results))

    if sys.argv[1] == "count":            # the operations of an uninterrupted run and of a re-save
        tmp = Path(sys.argv[2])
        assert run(str(tmp / "count"), report=str(tmp / "fresh.json")) == 0
        assert run(str(tmp / "count"), report=str(tmp / "resave.json")) == 0
        print(json.dumps({"fresh": json.load(open(tmp / "fresh.json")), "resave": json.load(open(tmp / "resave.json"))}))
    else:
        main(sys.argv[2], sys.argv[1], [int(k) for k in sys.argv[3].split(",")])
''')


def _helper(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HELPER, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def operations(tmp_path_factory) -> dict[str, list[str]]:
    """The file-system operations of an uninterrupted 2-step run and of its re-run (a re-save of step 2)."""
    return _helper("count", str(tmp_path_factory.mktemp("count")))


def _kill_points(ops: list[str], first: int) -> list[int]:
    """1-based indices of the operations from ``first`` on, except the middle of a run of deletions
    (killing between two unlinks of one folder leaves the same state as killing after the first)."""
    deleting = [o.split()[0] in ("unlink", "rmdir") for o in ops]
    return [k for k in range(first, len(ops) + 1)
            if not (1 < k < len(ops) and deleting[k - 2] and deleting[k - 1] and deleting[k])]


@pytest.mark.parametrize("scenario", ["fresh", "resave"])
def test_kill_at_every_checkpoint_operation_then_resume_is_bit_exact(operations, tmp_path, scenario):
    recorded = operations[scenario]
    resumed_at = next(i for i, o in enumerate(recorded) if o.startswith("resumed"))
    ops = [o for o in recorded if not o.startswith("resumed")]   # ops[k - 1] is the k-th operation
    if scenario == "fresh":   # the save of step 2: writes, swap, pruning of step 1 (keep_checkpoints 1), final copy
        kills = _kill_points(ops, next(i for i, o in enumerate(ops) if "step-000002" in o) + 1)
    else:                     # everything a finished run does after resuming: re-save of step 2, final copy
        kills = _kill_points(ops, resumed_at + 1)
    assert len(kills) >= 8, ops
    results = _helper(scenario, str(tmp_path), ",".join(map(str, kills)))
    bad = {k: r for k, r in results.items() if not (r["status"] == "killed" and r["resumed"] == 0 and r["same"])}
    assert not bad, {k: (ops[int(k) - 1], r) for k, r in bad.items()}
    for k, r in results.items():
        # never back to 0 while a complete copy exists: step 1 is complete before save 2 starts
        least = 1 if scenario == "fresh" else 2
        assert r["resumed_at"] is not None and int(r["resumed_at"].split()[-1]) >= least, (ops[int(k) - 1], r)
        # one complete checkpoint left (keep_checkpoints 1), no temporary or half-deleted folder
        assert r["checkpoints"] == ["step-000002"], (ops[int(k) - 1], r)
