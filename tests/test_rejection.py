"""`llamaforge align --method rejection-sampling` and Ghost Attention data: best-of-K by a reward
model on the train split's prompts only, the SFT JSONL it writes and the fine-tuning on it, resumable
sampling, Ghost Attention's instruction placement and loss masks (Llama 2 format and a Jinja
template), and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from llamaforge.cli import main
from llamaforge.train.data import build_sft_rows, read_sft_jsonl, render_example
from llamaforge.train.pairs import last_reply_mask, read_preference_jsonl, split_held_out
from llamaforge.train.preference import RewardModel
from llamaforge.train.rejection import (GATT_INSTRUCTIONS, Policy, SampleSettings, gatt_records, run_chunks,
                                        with_instruction)
from llamaforge.train.reward import Reward, write_reward_model

WORDS = ["fox", "dog", "llama", "world", "times", "quick", "lazy", "brown"]


def _pairs(n=30):
    """Preference records; every third one a two-turn conversation (for Ghost Attention)."""
    out = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        if i % 3 == 0:
            prompt = [{"role": "user", "content": f"the {a} {i}"}, {"role": "assistant", "content": f"the {b} jumps"},
                      {"role": "user", "content": f"the lazy {b}"}]
            out.append({"messages": prompt, "chosen": f"the {a} times", "rejected": f"{b} {b}"})
        else:
            out.append({"prompt": f"the quick {a} {i}", "chosen": f"the {a} jumps over", "rejected": f"{b} {b}"})
    return out


def _jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.fixture
def setup(make_checkpoint, tiny_tokenizer, tmp_path):
    """A tiny policy checkpoint, a tiny reward model folder and a pairs file."""
    base, _ = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    rm = RewardModel(tiny_model("tiny", 3), seed=1)
    with torch.no_grad():
        rm.score.weight.mul_(50)   # rewards spread well apart: best-of-K visibly beats one sample
    state = {**rm.model.state_dict(), "score.weight": rm.score.weight}
    write_reward_model(tmp_path / "rm", rm.args, state, tokenizer=tiny_tokenizer)
    return base, tmp_path / "rm", _jsonl(tmp_path / "pairs.jsonl", _pairs())


def _align(*args) -> int:
    return main(["align", "--method", "rejection-sampling", "--seq-len", "100", "--max-new-tokens", "12",
                 "--no-train.progress", *args])


def test_best_of_k_then_finetune(setup, tmp_path, capsys):
    """Samples come from train-split prompts only; each record keeps its highest-reward answer (the
    reward model re-scores it the same); best-of-K beats the single sample; the fine-tuning runs on
    the JSONL and the card records the data's sha256, the method and the sampling settings."""
    base, rm_dir, data = setup
    out = tmp_path / "rs"
    assert _align("--model", str(base), "--reward", str(rm_dir), "--data", str(data), "--output", str(out),
                  "--k", "4", "--gen-batch", "8", "--max-steps", "3", "--lora-r", "4", "--train.micro-batch-size", "2",
                  "--train.eval-every", "3", "--train.precision", "fp32") == 0
    err = capsys.readouterr()
    assert "mean reward best-of-4" in err.out and "fine-tuning loss" in err.err
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    train_p, held_p = split_held_out(read_preference_jsonl(data), 0.1, 0)
    train_prompts = {json.dumps(p.chosen[:-1]) for p in train_p}
    held_prompts = {json.dumps(p.chosen[:-1]) for p in held_p}
    assert len(recs) == len(train_prompts) == 27
    rewards = Reward.load(rm_dir).score([r["messages"] for r in recs])
    for rec, r in zip(recs, rewards):
        prompt = json.dumps(rec["messages"][:-1])
        assert prompt in train_prompts and prompt not in held_prompts
        assert len(rec["rewards"]) == 4 and rec["reward"] == max(rec["rewards"])
        assert r == pytest.approx(rec["reward"], abs=1e-4)   # the kept answer is the one that was scored
    assert read_sft_jsonl(out / "samples.jsonl")[0] == recs[0]["messages"]   # finetune's reader takes it as is
    summary = json.loads((out / "rejection_summary.json").read_text())
    assert summary["mean_reward_best_of_k"] == pytest.approx(np.mean([r["reward"] for r in recs]))
    assert summary["mean_reward_single_sample"] == pytest.approx(np.mean([r["rewards"][0] for r in recs]))
    assert summary["mean_reward_best_of_k"] > summary["mean_reward_all_samples"] > summary["mean_reward_best_of_k"] - 50
    assert summary["gain_over_single_sample"] > 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["produced_by"] == "llamaforge align --method rejection-sampling" and len(card["openness"]) == 14
    assert "best of 4" in card["method"] and card["training_config"]["steps_done"] == 3
    sha = card["training_config"]["rejection_sampling"]["data_sha256"]
    assert [d["sha256"] for d in card["data_files"]][0] == sha and len(sha) == 64
    assert card["evaluation"]["mean_reward_best_of_k"] == pytest.approx(summary["mean_reward_best_of_k"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "OPENNESS.md").is_file()
    assert not (out / "samples.partial.jsonl").exists()

    # sample only, other batching: the same answers (each answer's seed is its own, batches do not matter)
    again = tmp_path / "rs2"
    assert _align("--model", str(base), "--reward", str(rm_dir), "--data", str(data), "--output", str(again),
                  "--k", "4", "--gen-batch", "12", "--sample-only") == 0
    assert (again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()
    assert json.loads((again / "model_card.json").read_text())["evaluation"]["records"] == 27
    assert not (again / "adapter_model.safetensors").exists()


def test_sampling_resumes_chunk_by_chunk(tmp_path):
    """A pass killed after its second chunk redoes only the rest and returns the uninterrupted
    records; a line cut by the kill is ignored; other settings start over."""
    items = [(i, f"p{i}") for i in range(7)]
    calls = []

    def build(part, fail_at=None):
        calls.append([i for i, _ in part])
        if fail_at is not None and part[0][0] >= fail_at:
            raise KeyboardInterrupt
        return [{"prompt_index": i, "text": p.upper()} for i, p in part]

    ref = run_chunks(items, build, 2, tmp_path / "ref.jsonl", "key")
    partial = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_chunks(items, lambda part: build(part, fail_at=4), 2, partial, "key")
    with open(partial, "a") as f:
        f.write('{"prompt_index": 4, "te')   # torn line
    calls.clear()
    assert run_chunks(items, build, 2, partial, "key") == ref
    assert calls == [[4, 5], [6]]
    calls.clear()
    run_chunks(items, build, 2, partial, "other settings")
    assert len(calls) == 4


class _Recorder(Policy):
    """A policy whose answers are fixed strings; records every context it was asked to answer."""

    def __init__(self, tokenizer, template):
        super().__init__(tiny_model(), tokenizer, template, SampleSettings(k=2, max_new_tokens=8))
        self.seen = []

    def answers(self, contexts, keys):
        self.seen += [list(c) for c in contexts]
        return [[f"reply {i} {t} {j}" for j in range(self.s.k)] for (i, t) in keys]


def _check_gatt(tokenizer, template, tmp_path):
    policy = _Recorder(tokenizer, template)
    dialogues = [(0, ["hello there", "and then", "bye now"]), (1, ["one", "two"])]
    score = lambda convs: [float(len(c[-1]["content"]) + (c[-1]["content"].endswith("1"))) for c in convs]  # noqa: E731
    recs = gatt_records(policy, dialogues, score, ["Answer in French.", "Always answer as a pirate."])
    # sampling: the instruction on every user turn; the best of each turn's K answers is carried on
    for ctx in policy.seen:
        users = [m["content"] for m in ctx if m["role"] == "user"]
        assert users and all(u.startswith(recs[0]["instruction"] if ctx[0]["content"].endswith(("there", "then", "now"))
                                          else recs[1]["instruction"]) for u in users)
        assert all(m["content"].endswith(" 1") for m in ctx if m["role"] == "assistant")
    assert len(policy.seen) == 5
    for rec, (_, users) in zip(recs, dialogues):
        msgs = rec["messages"]
        got_users = [m["content"] for m in msgs if m["role"] == "user"]
        assert got_users == [with_instruction(rec["instruction"], users[0])] + users[1:]
        assert [m.get("weight", 1) for m in msgs if m["role"] == "assistant"] == [0] * (len(users) - 1) + [1]
    # the loss mask the fine-tuning builds: the last reply only, and exactly what unweighted rendering
    # marks as that reply
    path = _jsonl(tmp_path / "gatt.jsonl", recs)
    dialogs = read_sft_jsonl(path)
    rows = build_sft_rows(dialogs, tokenizer, template, 200, progress=False).rows
    for (ids, mask), msgs in zip(rows, dialogs):
        plain_ids, plain_mask = render_example(tokenizer, [{"role": m["role"], "content": m["content"]} for m in msgs],
                                               template)
        assert list(ids) == plain_ids and sum(plain_mask) > mask.sum() > 0
        np.testing.assert_array_equal(mask, last_reply_mask(plain_mask))
        assert msgs[-1]["content"] in tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_ghost_attention_llama2_format(tiny_tokenizer, tmp_path):
    _check_gatt(tiny_tokenizer, None, tmp_path)


def test_ghost_attention_jinja_template(bundled_gguf, tmp_path):
    from llamaforge.tokenizer import Tokenizer
    tok = Tokenizer.load(bundled_gguf)   # SmolLM2's ChatML template; the recorder never runs its tiny model
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    _check_gatt(tok, tok.chat_template, tmp_path)


def test_ghost_attention_cli_samples_from_the_policy(setup, tmp_path):
    """--ghost-attention: the policy answers each turn (best of 2), records keep the instruction once."""
    base, rm_dir, data = setup
    out = tmp_path / "gatt"
    assert _align("--model", str(base), "--reward", str(rm_dir), "--data", str(data), "--output", str(out),
                  "--ghost-attention", "--k", "2", "--sample-only", "--gatt-instructions", "Answer in French.") == 0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    train_p, _ = split_held_out(read_preference_jsonl(data), 0.1, 0)
    multi = [p for p in train_p if sum(m["role"] == "user" for m in p.chosen) >= 2]
    assert len(recs) == len(multi) > 5 and all(r["instruction"] == "Answer in French." for r in recs)
    for r in recs:
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert users[0].startswith("Answer in French.\n\n") and not users[1].startswith("Answer in French.")
        assert len(r["rewards"]) == 2 and r["messages"][1]["weight"] == 0 and "weight" not in r["messages"][3]
    assert "Answer in French." in GATT_INSTRUCTIONS


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    base, rm_dir, data = setup
    common = ["--model", str(base), "--data", str(data), "--output", str(tmp_path / "o")]
    cases = [(common, "needs a reward model"),
             ([*common, "--reward", str(tmp_path / "nope")], "reward model folder not found"),
             ([*common, "--reward", str(rm_dir), "--k", "0"], "k (samples per prompt) must be >= 1"),
             ([*common, "--reward", str(rm_dir), "--ghost-attention", "--gatt-turns", "1"], "gatt_turns must be >= 2"),
             ([*common, "--reward", str(rm_dir), "--temperature", "-1"], "temperature must be >= 0"),
             ([*common, "--reward", str(rm_dir), "--max-new-tokens", "500"], "no prompt of the train split fits")]
    for args, message in cases:
        assert _align(*args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    bad = _jsonl(tmp_path / "w.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b", "weight": 2}]}])
    with pytest.raises(ValueError, match=r"w\.jsonl:1: messages\[1\]: 'weight' must be 0 or 1"):
        read_sft_jsonl(bad)
