"""Training: tokenizer recipe, token shards, SFT rendering/masks, the trainer's maths, exact kill-and-resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaforge.config import preset
from llamaforge.model import Transformer
from llamaforge.train import data as D
from llamaforge.train.trainer import TrainConfig, Trainer, lr_at

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
GSM8K = ROOT.parent / "shared" / "data" / "sft" / "gsm8k_train.jsonl"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    p = tmp_path_factory.mktemp("corpus") / "shakespeare_head.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:120_000] + "\nIn 1599, 42 players.\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    return D.train_sentencepiece([corpus], tmp_path_factory.mktemp("tok"), vocab_size=512)


@pytest.fixture(scope="module")
def shards(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    D.pretokenize_files([corpus], tok_dir, out, val_fraction=0.1, shard_tokens=10_000, progress=False)
    return out


# ---------------------------------------------------------------- tokenizer + shards

def test_tokenizer_follows_llama2_recipe(tok_dir, corpus):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString((tok_dir / "tokenizer.model").read_bytes())
    spec = proto.trainer_spec
    assert spec.model_type == pb.TrainerSpec.BPE and spec.byte_fallback and spec.split_digits
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, 512)
    tok = D.load_tokenizer(tok_dir)
    text = "ROMEO:\nThe year 2024 costs £12 — ünïcode ok?"
    ids = tok.encode(text)
    assert ids == sp.encode(text)                       # llamaforge's Tokenizer agrees with sentencepiece
    assert tok.decode(ids) == text                      # byte fallback: nothing is lost
    pieces = [sp.id_to_piece(i) for i in sp.encode("2024")]
    assert all(len(p.strip("▁")) <= 1 or p.startswith("<0x") for p in pieces)  # digits one by one


def test_pretokenized_shards_hold_the_token_stream(shards, tok_dir, corpus):
    tok = D.load_tokenizer(tok_dir)
    meta = json.loads((shards / "meta.json").read_text())
    train, val = D.TokenShards(shards, "train"), D.TokenShards(shards, "val")
    assert len(meta["shards"]["train"]) > 1                    # several memory-mapped shards
    stream = np.concatenate([train.window(0, len(train)), val.window(0, len(val))])
    expected = [tok.bos_id] + [i for piece in D._documents(corpus) for i in tok.encode(piece)] + [tok.eos_id]
    assert stream.tolist() == expected
    assert len(val) == int(len(expected) * 0.1)
    src = D.PretrainSource(train, 32, seed=3)
    a, m = src.batch([0, 1, 2])
    b, _ = src.batch([0, 1, 2])
    assert a.shape == (3, 33) and bool(m.all()) and torch.equal(a, b)   # deterministic by sample index
    off = int(np.random.default_rng([3, 1]).integers(0, len(train) - 32))
    assert a[1].tolist() == train.window(off, 33).tolist()


def test_pretokenize_errors(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.pretokenize_files([tmp_path / "missing.txt"], tok_dir, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        D.TokenShards(tmp_path)


# ---------------------------------------------------------------- SFT data

def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_sft_record_shapes_and_line_numbered_errors(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"prompt": "Say a", "completion": "a"},
            {"question": "1+1?", "answer": "2\n#### 2"}]
    got = D.read_sft_jsonl(_write_jsonl(tmp_path / "ok.jsonl", recs))
    assert got[1] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert got[3][1]["content"].endswith("#### 2")
    bad = _write_jsonl(tmp_path / "bad.jsonl", recs[:2] + ['{"question": "q", "answer": 3}'])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'answer' must be a string"):
        D.read_sft_jsonl(bad)
    with pytest.raises(ValueError, match=r":2: invalid JSON"):
        D.read_sft_jsonl(_write_jsonl(tmp_path / "j.jsonl", [recs[0], "{oops"]))
    with pytest.raises(ValueError, match=r":1: unrecognised record"):
        D.read_sft_jsonl(_write_jsonl(tmp_path / "u.jsonl", [{"text": "x"}]))


@pytest.fixture(scope="module")
def smol_tokenizer():
    from llamaforge.paths import default_model_path
    from llamaforge.tokenizer import Tokenizer
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return Tokenizer.load(path)


def test_sft_rendering_matches_transformers_chat_template(smol_tokenizer, tmp_path):
    """Our rendering (per-turn segments) gives the ids transformers' apply_chat_template gives, and the
    loss mask covers exactly the assistant replies with their end-of-turn token."""
    transformers = pytest.importorskip("transformers")
    smol_tokenizer.save(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 x 7?"},
            {"role": "assistant", "content": "6 x 7 = 42\n#### 42"}, {"role": "user", "content": "And 2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, mask = D.render_example(smol_tokenizer, msgs)
    expected = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    trained = [i for i, m in zip(ids, mask) if m]
    assert smol_tokenizer.decode(trained, skip_special=False) == "6 x 7 = 42\n#### 42<|im_end|>\n4<|im_end|>\n"


def test_packing_and_row_batches(smol_tokenizer):
    dialogues = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}]
                 for i in range(6)]
    plain = D.build_sft_rows(dialogues, smol_tokenizer, None, 256, progress=False)
    packed = D.build_sft_rows(dialogues, smol_tokenizer, None, 256, pack=True, progress=False)
    assert len(plain.rows) == 6 and len(packed.rows) < 6
    assert sum(len(r[0]) for r in packed.rows) == sum(len(r[0]) for r in plain.rows)
    assert sum(int(r[1].sum()) for r in packed.rows) == sum(int(r[1].sum()) for r in plain.rows)
    src = D.RowSource(plain.rows, seed=1, pad_id=0)
    tokens, mask = src.batch([0, 1, 2])
    assert tokens.shape[0] == 3 and mask.dtype == torch.bool
    assert int(mask.sum()) == sum(int(src._row(k)[1].sum()) for k in range(3))
    epoch0 = {tuple(src._row(k)[0].tolist()) for k in range(6)}
    assert epoch0 == {tuple(r[0].tolist()) for r in plain.rows}   # one epoch = each row once


# ---------------------------------------------------------------- the trainer

class _FixedRows:
    """A tiny BatchSource over random token rows (for trainer maths without any data pipeline)."""

    def __init__(self, n=64, width=17, vocab=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n, width), generator=g)
        self.mask = torch.rand((n, width), generator=g) > 0.3

    def __len__(self):
        return len(self.tokens)

    def batch(self, indices):
        idx = [i % len(self.tokens) for i in indices]
        return self.tokens[idx], self.mask[idx]


def _steps(tmp_path, name, n=6, **kw) -> list[dict]:
    """n optimizer steps of the trainer (no checkpoint writing: that is tested elsewhere)."""
    cfg = TrainConfig(output=str(tmp_path / name), progress=False, eval_every=0, precision="fp32",
                      **{"max_steps": n, "lr": 3e-3, "warmup_steps": 2, **kw})
    t = Trainer(Transformer(preset("tiny")).init_weights(0), cfg, _FixedRows())
    out = []
    for _ in range(n):
        out.append(t._train_step())
        t.step += 1
    return out


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    big = _steps(tmp_path, "big", micro_batch_size=4, grad_accum=1)
    acc = _steps(tmp_path, "acc", micro_batch_size=2, grad_accum=2)
    assert [r["targets"] for r in big] == [r["targets"] for r in acc]
    np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in big], rtol=1e-5)
    assert big[-1]["loss"] < big[0]["loss"]


def test_trainer_matches_a_hand_written_adamw_step(tmp_path):
    """One step of the trainer = masked token-mean cross-entropy, clip at 1.0, torch AdamW(0.9, 0.95, 1e-5, wd 0.1)."""
    src = _FixedRows(n=4)
    ref = Transformer(preset("tiny")).init_weights(0)
    tokens, mask = src.batch([0, 1, 2, 3])
    logits = ref(tokens[:, :-1])
    m = mask[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[m], tokens[:, 1:][m])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    rest = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-5)
    opt.step()
    model = Transformer(preset("tiny")).init_weights(0)
    cfg = TrainConfig(output=str(tmp_path / "one"), max_steps=1, micro_batch_size=4, lr=1e-3, warmup_steps=0,
                      progress=False, eval_every=0, precision="fp32")
    t = Trainer(model, cfg, src)
    rec = t._train_step()
    assert rec["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_bad_trainer_options():
    with pytest.raises(ValueError, match="unknown trainer option"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="precision"):
        Trainer(Transformer(preset("tiny")), TrainConfig(precision="fp8"), _FixedRows())


# ---------------------------------------------------------------- commands: YAML + flags, kill and resume

def _cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamaforge.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resolve_options_yaml_then_flags(tmp_path):
    from llamaforge.options import build
    from llamaforge.train.configs import PretrainConfig
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 7\nlr: 0.01\ndata: shards\n")
    opts = build(PretrainConfig, str(cfg), {"train.lr": 0.5})
    assert opts.train.max_steps == 7 and opts.train.lr == 0.5 and opts.train.seed == PretrainConfig().train.seed
    assert opts.data == str(tmp_path / "shards")          # relative to the config file
    cfg.write_text("train:\n  max_steps: 7\n  lr: 0.01\ndata: shards\n")   # nested sections: the same fields
    assert build(PretrainConfig, str(cfg), {"train.lr": 0.5}) == opts
    cfg.write_text("max_step: 7\n")
    with pytest.raises(ValueError, match="unknown option"):
        build(PretrainConfig, str(cfg), {})


@pytest.mark.slow
@needs_shakespeare
def test_kill_and_resume_reproduces_the_loss_curve(tmp_path, tok_dir, shards):
    """SIGKILL a pretraining run mid-way; the resumed run continues the uninterrupted run's curve exactly."""
    common = ["pretrain", "--tokenizer", str(tok_dir), "--data", str(shards), "--train.max-steps", "7",
              "--train.save-every", "3", "--train.eval-every", "3", "--train.eval-batches", "2",
              "--train.micro-batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
              "--n-kv-heads", "1", "--train.warmup-steps", "2", "--train.lr", "3e-3", "--train.precision", "fp32",
              "--sample-tokens", "0", "--no-train.progress"]
    ref = _cli(*common, "--output", str(tmp_path / "ref"))
    run = _cli(*common, "--output", str(tmp_path / "run"))
    deadline = time.time() + 120
    while time.time() < deadline:  # kill after the step-3 checkpoint, before the run ends
        log = tmp_path / "run" / "train_log.jsonl"
        if log.exists() and sum(1 for _ in log.open()) >= 4:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert ref.wait(timeout=180) == 0, ref.stderr.read()
    killed_at = len(_log(tmp_path / "run"))
    assert killed_at < 8, "the run finished before it could be killed"
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()
    resumed = _cli(*common, "--output", str(tmp_path / "run"))
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    a, b = _log(tmp_path / "ref"), _log(tmp_path / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 8))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["val_loss"] for r in b if "val_loss" in r],
                               [r["val_loss"] for r in a if "val_loss" in r], rtol=1e-6)
    final = tmp_path / "run"
    assert (final / "config.json").is_file() and (final / "loss_curve.png").stat().st_size > 1000
    assert not list((final / "checkpoints").glob(".tmp-*"))
    _assert_card(final, "pretrain", data=shards)


def _assert_card(folder, produced_by, data=None):
    """The model card every written checkpoint gets: both files, the run's facts, the 14-row openness report."""
    import json
    card = json.loads((folder / "model_card.json").read_text())
    assert (folder / "MODEL_CARD.md").is_file() and (folder / "OPENNESS.md").is_file()
    assert produced_by in card["produced_by"] and card["parameters"] > 0
    assert len(card["openness"]) == 14
    if data is not None:
        assert card["data_files"] and all(len(f["sha256"]) == 64 for f in card["data_files"])
    return card


def test_finetune_full_then_lora_on_a_tiny_llama(tmp_path, tok_dir):
    """finetune end to end on a tiny HF checkpoint with a sentencepiece tokenizer (Llama 2 chat format):
    full fine-tuning lowers the validation loss; a LoRA run on its output saves a PEFT adapter that
    Llama.load(adapter=...) applies and `merge` folds in with the same logits."""
    from llamaforge.api import Llama
    from llamaforge.formats import hf
    from llamaforge.options import build
    from llamaforge.train.commands import merge, run_finetune
    from llamaforge.train.configs import FinetuneConfig
    tok = D.load_tokenizer(tok_dir)
    args = preset("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=256)
    hf.write(tmp_path / "base", args, dict(Transformer(args).init_weights(0).state_dict()), tokenizer=tok)
    recs = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"} for i in range(40)]
    data = _write_jsonl(tmp_path / "sft.jsonl", recs)
    common = {"data": str(data), "train.micro_batch_size": 4, "train.grad_accum": 1, "train.warmup_steps": 1,
              "train.eval_every": 4, "train.eval_batches": 2, "train.save_every": 0, "seq_len": 128,
              "val_fraction": 0.1, "train.progress": False, "train.precision": "fp32"}
    full = run_finetune(build(FinetuneConfig, None, {
        **common, "model": str(tmp_path / "base"), "method": "full", "train.max_steps": 8, "train.lr": 3e-3,
        "output": str(tmp_path / "full")}))
    vals = [r["val_loss"] for r in _log(tmp_path / "full") if "val_loss" in r]
    assert full["step"] == 8 and vals[-1] < vals[0] - 0.3, vals
    assert Llama.load(tmp_path / "full").args.ffn_hidden == args.ffn_hidden
    card = _assert_card(tmp_path / "full", "finetune", data=data)
    assert card["loss_curve"]["points"] >= 8 and card["training_config"]

    lora = run_finetune(build(FinetuneConfig, None, {
        **common, "model": str(tmp_path / "full"), "method": "lora", "train.max_steps": 4, "train.lr": 1e-2,
        "lora_r": 4, "lora_alpha": 8.0, "output": str(tmp_path / "lora")}))
    assert lora["step"] == 4 and (tmp_path / "lora" / "adapter_config.json").is_file()
    ids = tok.encode("[INST] What is 3 plus 3? [/INST]", bos=True)
    base_logits = Llama.load(tmp_path / "full").logits(ids)
    adapted = Llama.load(tmp_path / "full", adapter=tmp_path / "lora").logits(ids)
    assert (adapted - base_logits).abs().max() > 1e-3               # the trained adapter does something
    assert merge(str(tmp_path / "full"), str(tmp_path / "lora"), output=str(tmp_path / "merged"),
                 gguf=str(tmp_path / "merged.gguf"), qtype="f32") == 0
    torch.testing.assert_close(Llama.load(tmp_path / "merged").logits(ids), adapted, atol=1e-4, rtol=0)
    torch.testing.assert_close(Llama.load(tmp_path / "merged.gguf").logits(ids), adapted, atol=1e-4, rtol=0)
    _assert_card(tmp_path / "lora", "finetune", data=data)
    _assert_card(tmp_path / "merged", "merge")


def test_lora_run_resumes_after_a_crash(tmp_path):
    """A LoRA run (only the adapters in trainer_state) that crashes after its step-2 checkpoint resumes
    with the same losses as an uninterrupted run (LoRA dropout makes the restored RNG state matter)."""
    from llamaforge.lora import LoraConfig, apply_lora

    def lora_model():
        m = Transformer(preset("tiny")).init_weights(0)
        torch.manual_seed(0)
        return apply_lora(m, LoraConfig(r=4, alpha=8, dropout=0.1))   # dropout: the RNG state matters

    def cfg(name):
        return TrainConfig(output=str(tmp_path / name), max_steps=5, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                           save_every=2, eval_every=0, progress=False, precision="fp32")

    Trainer(lora_model(), cfg("ref"), _FixedRows()).fit()
    crashing = Trainer(lora_model(), cfg("run"), _FixedRows())
    real_step = crashing._train_step

    def crash_at_4():
        if crashing.step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step()
    crashing._train_step = crash_at_4
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state" / "model.pt")
    assert state and all(".lora_" in k for k in state)
    Trainer(lora_model(), cfg("run"), _FixedRows()).fit()
    a, b = _log(tmp_path / "ref"), _log(tmp_path / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
