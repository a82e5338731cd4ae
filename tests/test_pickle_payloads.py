"""No code from disk (issue 14 item 5): every file the project reads with torch.load refuses a pickle
that would run code, with a clear error naming the file, and the payload never runs. The files:
Meta shards, HF pytorch_model.bin, PEFT adapter_model.bin, the trainer's model.pt / optimizer.pt /
rng.pt, and the guard trainer's feature cache (safety/training/recipes.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from llamaforge.errors import CheckpointError
from llamaforge.formats import hf, load_checkpoint, meta
from llamaforge.train.trainer import STATE_DIR, TrainConfig, Trainer


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code a hostile file would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, legacy: bool = False) -> None:
    """Replace ``path`` by a torch file whose pickle holds the payload (zip format, or the legacy stream)."""
    obj = {"tok_embeddings.weight": Payload(marker), "state": [Payload(marker)]}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def refused(load, path: Path, marker: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        load()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert not marker.exists(), "the payload ran"


class _Rows:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 256, (16, 9), generator=g)
        self.mask = torch.ones_like(self.tokens, dtype=torch.bool)

    def __len__(self):
        return 16

    def batch(self, indices):
        idx = [i % 16 for i in indices]
        return self.tokens[idx], self.mask[idx]


def _trainer(out: Path, steps: int) -> Trainer:
    cfg = TrainConfig(output=str(out), max_steps=steps, micro_batch_size=2, lr=1e-2, warmup_steps=1, save_every=1,
                      keep_checkpoints=1, eval_every=0, progress=False, precision="fp32")
    return Trainer(tiny_model(), cfg, _Rows())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    _trainer(out, 2).fit()
    return out


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rng.pt"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_trainer_resume_refuses_pickled_code(trained_run, tmp_path, name, legacy):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = run / "checkpoints" / "step-000002" / STATE_DIR / name
    marker = tmp_path / "PAYLOAD_RAN"
    plant(target, marker, legacy)
    refused(lambda: _trainer(run, 3).fit(), target, marker)


def test_trainer_state_is_tensors_and_plain_containers(trained_run):
    """What a save writes loads with weights_only=True (so the refusal above costs nothing), and resumes."""
    state = trained_run / "checkpoints" / "step-000002" / STATE_DIR
    for name in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.load(state / name, weights_only=True)
    rng = torch.load(state / "rng.pt", weights_only=True)
    assert isinstance(rng, list) and rng[0]["torch"].dtype == torch.uint8


def test_meta_shard_and_hf_bin_refuse_pickled_code(tmp_path):
    model = tiny_model()
    marker = tmp_path / "PAYLOAD_RAN"
    meta.write(tmp_path / "meta", model.args, model.state_dict())
    shard = tmp_path / "meta" / "consolidated.00.pth"
    plant(shard, marker)
    refused(lambda: load_checkpoint(tmp_path / "meta"), shard, marker)
    hf.write(tmp_path / "hf", model.args, model.state_dict())
    (tmp_path / "hf" / "model.safetensors").unlink()
    for legacy in (False, True):
        bin_file = tmp_path / "hf" / "pytorch_model.bin"
        plant(bin_file, marker, legacy)
        refused(lambda: load_checkpoint(tmp_path / "hf"), bin_file, marker)


def test_lora_adapter_bin_refuses_pickled_code(tmp_path):
    from llamaforge.lora import LoraConfig, apply_lora, load_adapter, save_adapter
    model = tiny_model()
    adapted = apply_lora(tiny_model(), LoraConfig(r=2, alpha=4))
    save_adapter(adapted, tmp_path / "adapter")
    for f in (tmp_path / "adapter").glob("adapter_model.safetensors"):
        f.unlink()
    marker = tmp_path / "PAYLOAD_RAN"
    target = tmp_path / "adapter" / "adapter_model.bin"
    plant(target, marker)
    refused(lambda: load_adapter(model, tmp_path / "adapter"), target, marker)


def test_guard_feature_cache_refuses_pickled_code(tmp_path, monkeypatch):
    from llamaforge.safety.training import recipes
    monkeypatch.setenv("LLAMAFORGE_HOME", str(tmp_path))
    marker = tmp_path / "PAYLOAD_RAN"
    target = tmp_path / "features.pt"
    plant(target, marker)
    refused(lambda: recipes._cached("features.pt", ["a"], lambda texts: [torch.zeros(2) for _ in texts], 8, "x"),
            target, marker)
