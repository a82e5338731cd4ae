"""`llamaforge align` (reward model, DPO): losses and scores against TRL's code and transformers'
LlamaForSequenceClassification, the HH-RLHF parser and split, bad input, and CLI runs that resume
after a SIGKILL with the uninterrupted run's numbers."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_model
from llamaforge.cli import main
from llamaforge.train.pairs import (PairSource, parse_hh, read_preference_jsonl, record_to_pair, render_pairs,
                                    split_held_out)
from llamaforge.train.preference import DPOObjective, RewardModel, RewardObjective, sequence_logps

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"


def _records(n=24):
    words = ["fox", "dog", "llama", "world", "times", "quick", "lazy", "brown"]
    out = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        out.append({"prompt": f"the quick {a} {i}", "chosen": f"the {a} jumps over the lazy dog {i} times",
                    "rejected": f"{b} {b}", **({"margin": 0.5} if i % 3 == 0 else {})})
    return out


def _jsonl(path: Path, recs) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.fixture
def batch(tiny_tokenizer):
    rows = render_pairs([record_to_pair(r) for r in _records(6)], tiny_tokenizer, None, 120)
    return PairSource(rows, shuffle=False, pad_id=0).batch(list(range(6)))


# ---------------------------------------------------------------- data

def test_hh_parser_on_real_lines():
    if not HH.is_file():
        pytest.skip(f"{HH} not present")
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        lines = [json.loads(next(f)) for _ in range(5)]
    for rec in lines:
        pair = record_to_pair(rec)
        for msgs in (pair.chosen, pair.rejected):
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            assert all("Human:" not in m["content"] and "Assistant:" not in m["content"] for m in msgs)
        assert pair.chosen[:-1] == pair.rejected[:-1] and pair.chosen[-1] != pair.rejected[-1]
    first = record_to_pair(lines[0])
    assert first.chosen[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.chosen[-1]["content"].startswith("No, sorry!")
    assert parse_hh("\n\nHuman: a\n\nHuman: b\n\nAssistant: c") == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_split_is_deterministic_and_disjoint():
    items = list(range(2312))
    train, held = split_held_out(items, 0.1, 0)
    assert (len(train), len(held)) == (2081, 231)
    assert split_held_out(items, 0.1, 0) == (train, held)
    assert not set(train) & set(held) and sorted(train + held) == items
    assert split_held_out(items, 0.1, 1)[1] != held
    if HH.is_file():
        pairs = read_preference_jsonl(HH)
        tr, ho = split_held_out(pairs, 0.1, 0)
        assert len(tr) == 2081 and {json.dumps(p.chosen) for p in tr}.isdisjoint({json.dumps(p.chosen) for p in ho})


def test_bad_preference_records(tmp_path):
    with pytest.raises(ValueError, match=r"b\.jsonl:2: invalid JSON"):
        read_preference_jsonl(_jsonl(tmp_path / "b.jsonl", [_records(1)[0], "{oops"]))
    with pytest.raises(ValueError, match=r":1: missing field\(s\) 'rejected'"):
        read_preference_jsonl(_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}]))
    with pytest.raises(ValueError, match=r":1: 'margin' must be a number"):
        read_preference_jsonl(_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "x"}]))
    with pytest.raises(ValueError, match="not an HH-RLHF transcript"):
        record_to_pair({"chosen": "hello", "rejected": "there"})


# ---------------------------------------------------------------- against TRL and transformers

def _fake_trainer(model, **kw):
    """The attributes TRL's loss code reads from its trainer (single process: gathers are identities)."""
    acc = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m,
                          device=torch.device("cpu"))
    return SimpleNamespace(model=model, accelerator=acc, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1, **kw)


def test_reward_loss_and_scores_equal_trl_and_transformers(batch, tiny_tokenizer, tmp_path):
    """Our reward model exported as LlamaForSequenceClassification: transformers' scores equal ours,
    TRL's RewardTrainer.compute_loss on them equals our loss (with margins), within 1e-4."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from llamaforge.train.reward import Reward, write_reward_model
    rm = RewardModel(tiny_model("tiny", 1), seed=3)
    with torch.no_grad():
        rm.score.weight.mul_(50)   # spread the scores so the loss is not ~log 2 everywhere
    state = {**{k: v for k, v in rm.model.state_dict().items()}, "score.weight": rm.score.weight}
    write_reward_model(tmp_path / "rm", rm.args, state, tokenizer=tiny_tokenizer)
    tokens, mask, lengths, margin, weight, index = batch
    loss_sum, metrics = RewardObjective(rm)(tokens, mask, lengths, margin, weight, index)
    ours = rm(tokens, lengths)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    pad = hf.config.pad_token_id
    ids = tokens.clone()
    ids[torch.arange(ids.shape[1]).expand_as(ids) >= lengths.unsqueeze(1)] = pad
    attn = (torch.arange(ids.shape[1]).expand_as(ids) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
        fake = _fake_trainer(hf, args=SimpleNamespace(center_rewards_coefficient=None))
        trl_loss = trl.RewardTrainer.compute_loss(fake, hf, {"input_ids": ids, "attention_mask": attn, "margin": margin})
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours.max() - ours.min()) > 0.1
    assert abs(loss_sum.item() / 6 - trl_loss.item()) < 1e-4
    assert abs(metrics["accuracy"].item() / 6 - fake._metrics["eval"]["accuracy"][0]) < 1e-6
    # Reward.load reads the folder back: the same scores for the same token rows
    back = Reward.load(tmp_path / "rm")
    rows = [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]
    np.testing.assert_allclose(back.score_tokens(rows), ours.tolist(), atol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_rewards_equal_trl(batch, tmp_path, loss_type):
    """TRL's DPOTrainer loss code (policy log-probs by transformers' LlamaForCausalLM through TRL's
    fused LM head; reference log-probs precomputed) equals our DPO objective within 1e-4."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head
    from llamaforge.formats import hf as hf_format
    policy, ref = tiny_model("tiny", 1), tiny_model("tiny", 2)
    hf_format.write(tmp_path / "policy", policy.args, policy.state_dict())
    tokens, mask, lengths, margin, weight, index = batch
    with torch.no_grad():
        ref_logps = sequence_logps(ref, tokens, mask)
    obj = DPOObjective(policy, beta=0.5, loss_type=loss_type, reference="table")
    obj.set_reference_table(torch.stack(ref_logps.chunk(2), dim=1))
    loss_sum, metrics = obj(tokens, mask, lengths, margin, weight, index)

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    attn = (torch.arange(tokens.shape[1]).expand_as(tokens) < lengths.unsqueeze(1)).long()
    rc, rr = ref_logps.chunk(2)
    inputs = {"input_ids": tokens, "attention_mask": attn, "completion_mask": mask.long(),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    fake = _fake_trainer(model, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                         f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=0.5,
                         label_smoothing=0.0, use_weighting=False, args=SimpleNamespace())
    with torch.no_grad():
        trl_loss = trl.DPOTrainer._compute_loss(fake, model, inputs, False)
    m = fake._metrics["eval"]  # the model is in eval mode
    assert abs(loss_sum.item() / 6 - trl_loss.item()) < 1e-4
    assert abs(metrics["reward_chosen"].item() / 6 - m["rewards/chosen"][0]) < 1e-4
    assert abs(metrics["reward_rejected"].item() / 6 - m["rewards/rejected"][0]) < 1e-4
    assert abs(metrics["reward_chosen"].item() - metrics["reward_rejected"].item()) > 1e-3


def test_dpo_label_smoothing_is_conservative_dpo(batch):
    """TRL 1.x dropped label smoothing from its sigmoid loss; ours is cDPO as TRL 0.x wrote it:
    -(1-ε)·log σ(βd) - ε·log σ(-βd), re-derived here in NumPy."""
    policy, ref = tiny_model("tiny", 1), tiny_model("tiny", 2)
    tokens, mask, lengths, margin, weight, index = batch
    with torch.no_grad():
        p, r = sequence_logps(policy, tokens, mask).double().numpy(), sequence_logps(ref, tokens, mask).double().numpy()
        obj = DPOObjective(policy, beta=0.3, label_smoothing=0.2, reference="table")
        obj.set_reference_table(torch.stack(torch.from_numpy(r).float().chunk(2), dim=1))
        loss_sum, _ = obj(tokens, mask, lengths, margin, weight, index)
    d = 0.3 * ((p[:6] - r[:6]) - (p[6:] - r[6:]))
    logsig = lambda x: -np.logaddexp(0, -x)  # noqa: E731
    expected = np.mean(-(0.8) * logsig(d) - 0.2 * logsig(-d))
    assert abs(loss_sum.item() / 6 - expected) < 1e-5


# ---------------------------------------------------------------- the command, killed and resumed

def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamaforge.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_align_cli_resumes_after_a_kill(method, make_checkpoint, tiny_tokenizer, tmp_path):
    """A run killed after its step-2 checkpoint and started again ends with the uninterrupted run's
    losses, held-out metrics and model files; the output has curves, a model card and openness report."""
    base, _ = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    data = _jsonl(tmp_path / "pairs.jsonl", _records(40))
    extra = _jsonl(tmp_path / "extra.jsonl", _records(5))     # --extra-data: train part only
    common = ["align", "--method", method, "--model", str(base), "--data", str(data), "--extra-data", str(extra),
              "--max-steps", "6",
              "--seq-len", "120", "--lora-r", "4", "--lora-dropout", "0.1", "--train.micro-batch-size", "2",
              "--train.save-every", "2", "--train.eval-every", "3", "--train.eval-batches", "2", "--train.lr", "1e-2",
              "--train.warmup-steps", "1", "--train.precision", "fp32", "--no-train.progress"]
    ref = _cli(*common, "--output", str(tmp_path / "ref"))
    run = _cli(*common, "--output", str(tmp_path / "run"))
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "step-000002").is_dir():
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert ref.wait(timeout=120) == 0, ref.stderr.read()
    assert len(_log(tmp_path / "run")) < 6, "the run finished before it could be killed"
    resumed = _cli(*common, "--output", str(tmp_path / "run"))
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    a, b = _log(tmp_path / "ref"), _log(tmp_path / "run")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    for key in ("loss", "accuracy", "reward_chosen", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([r[key] for r in b if key in r], [r[key] for r in a if key in r], rtol=1e-6)
    out = tmp_path / "run"
    weights = "model.safetensors" if method == "reward" else "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()
    assert (out / "loss_curve.png").stat().st_size > 1000
    card = json.loads((out / "model_card.json").read_text())
    assert card["produced_by"] == f"llamaforge align --method {method}" and len(card["openness"]) == 14
    assert len(card["data_files"][0]["sha256"]) == 64 and card["training_config"]["train_pairs"] == 36 + 5
    assert card["training_config"]["held_out_pairs"] == 4
    assert card["data_files"][1]["path"] == str(extra) and card["data_files"][1]["split"] == "train only"
    assert len(card["data_files"][1]["sha256"]) == 64
    assert (out / "OPENNESS.md").is_file() and "reward_chosen" in b[-1]
    if method == "reward":
        _reward_folder_round_trip(out)


def _reward_folder_round_trip(folder: Path):
    """The LoRA-trained reward model (adapters merged) loads in transformers with our scores, and
    `llamaforge score` scores a JSONL of conversations."""
    transformers = pytest.importorskip("transformers")
    from llamaforge.train.reward import Reward
    rm = Reward.load(folder)
    convs = [[{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": t}]
             for t in ("the fox jumps over the lazy dog", "dog dog", "hello world")]
    ours = rm.score(convs)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = [hf(input_ids=torch.tensor([rm.tokens(c)])).logits.item() for c in convs]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert rm.score(convs[0]) == pytest.approx(ours[0], abs=1e-6)
    data = _jsonl(folder.parent / "convs.jsonl", [{"messages": c} for c in convs])
    assert main(["score", str(folder), str(data), "--output", str(folder.parent / "scores.jsonl")]) == 0
    lines = (folder.parent / "scores.jsonl").read_text().splitlines()
    np.testing.assert_allclose([json.loads(x)["score"] for x in lines], ours, atol=1e-5)


def test_align_cli_refuses_bad_input(tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}])
    out = ["--output", str(tmp_path / "o")]
    cases = [(["--method", "ppo", "--data", str(bad)], "--method ppo needs a reward model"),
             (["--method", "dpo", "--data", str(bad)], "bad.jsonl:1: missing field(s) 'rejected'"),
             (["--data", str(tmp_path / "none.jsonl")], "none.jsonl: preference data file not found"),
             (["--data", str(bad), "--beta", "x"], "invalid float value"),
             (["--method", "ppo", "--data", str(bad), "--reward", str(tmp_path), "--safety-reward",
               str(tmp_path / "nope")], "nope: reward model folder not found"),
             (["--method", "ppo", "--data", str(bad), "--reward", str(tmp_path), "--safety-reward", str(tmp_path),
               "--safety-threshold", "1.5"], "safety_threshold must be between 0 and 1")]
    for args, message in cases:
        try:
            code = main(["align", *args, *out])
        except SystemExit as e:   # argparse's own refusal
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_precomputed_reference_equals_adapters_off(tiny_tokenizer):
    """--precompute-ref: the table computed once equals the per-step reference (LoRA adapters off),
    and a full model's table is the model itself before training."""
    from llamaforge.lora import LoraConfig, apply_lora, lora_modules
    from llamaforge.train.preference import reference_table
    rows = render_pairs([record_to_pair(r) for r in _records(5)], tiny_tokenizer, None, 120)
    src = PairSource(rows, seed=0, pad_id=0)
    torch.manual_seed(0)
    model = apply_lora(tiny_model("tiny", 1), LoraConfig(r=4, alpha=8))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)   # adapters that change the output
    obj = DPOObjective(model, reference="adapters")
    table = reference_table(obj, src, batch_size=2)
    tokens, mask, lengths, margin, weight, index = src.batch(list(range(5)))
    per_step = obj.reference_logps(tokens, mask, index)
    torch.testing.assert_close(torch.cat([table[index, 0], table[index, 1]]), per_step, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (sequence_logps(model, tokens, mask) - per_step).abs().max() > 1e-3
    full = tiny_model("tiny", 2)
    t2 = reference_table(DPOObjective(full, reference="copy"), src, batch_size=5)
    with torch.no_grad():
        torch.testing.assert_close(t2[index, 0], sequence_logps(full, tokens, mask)[:5], atol=1e-5, rtol=0)


def test_shipped_align_configs_build():
    """Every configs/hh_*.yaml builds into AlignConfig with its files in place, and PPO's reward model is
    the output of the reward config."""
    from llamaforge.options import build
    from llamaforge.train.configs import AlignConfig
    root = Path(__file__).resolve().parents[1] / "configs"
    outputs, ppo = {}, None
    for f in sorted(root.glob("hh_*.yaml")):
        opts = build(AlignConfig, f, {})
        for extra in opts.extra_data or []:
            assert Path(extra).is_file(), (f.name, extra)
        outputs[f.name] = Path(opts.output).resolve()
        ppo = opts if opts.method == "ppo" else ppo
    assert ppo is not None and ppo.ppo_samples > 1 and ppo.temperature > 0
    assert Path(ppo.reward).resolve() == outputs["hh_reward.yaml"]
