"""Model cards and openness reports: what is written next to a checkpoint, and `llamaforge card DIR`."""
from __future__ import annotations

import hashlib
import json

import pytest

from llamaforge.cards import CARD_JSON, CARD_MD, OPENNESS_MD, card, write_model_card
from llamaforge.openness import DIMENSIONS, openness_report


def _data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    jsonl = d / "sft.jsonl"
    jsonl.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(7)))
    csvf = d / "prompts.csv"
    csvf.write_text("id,prompt\n1,hello\n2,\"a, b\"\n3,x\n")
    return jsonl, csvf


def _status(card_json, title):
    return next(r for r in card_json["openness"] if r["dimension"] == title)


def test_finetune_card_records_everything(tmp_path, make_checkpoint, tiny_tokenizer):
    ckpt, model = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    jsonl, csvf = _data(tmp_path)
    (ckpt / "loss.csv").write_text("step,loss\n0,5.5\n10,4.0\n20,3.25\n")
    md, js = write_model_card(
        ckpt, produced_by="finetune", base_model="meta-llama/Llama-2-7b-hf", args=model.args,
        data_files=[str(jsonl), {"path": str(csvf), "source": "hand-written", "role": "tune"}],
        training_config={"lr": 2e-4, "lora": {"r": 8, "alpha": 16}, "epochs": 1},
        loss_curve="loss.csv", eval_results={"arc_easy": {"acc": 0.25, "n": 100}},
        safety_results={"guard_flagged_answers": 0.0}, license="llama2", method="lora")
    assert md == ckpt / CARD_MD and js == ckpt / CARD_JSON and (ckpt / OPENNESS_MD).is_file()
    c = json.loads(js.read_text())
    assert c["parameters"] == model.args.n_params and c["architecture"]["dim"] == model.args.dim
    files = {f["path"]: f for f in c["data_files"]}
    assert files[str(jsonl)]["sha256"] == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    assert files[str(jsonl)]["records"] == 7 and files[str(csvf)]["records"] == 3
    assert c["loss_curve"]["first_loss"] == 5.5 and c["loss_curve"]["last_loss"] == 3.25 and c["loss_curve"]["points"] == 3
    assert c["training_config"]["lora"]["r"] == 8 and c["evaluation"]["arc_easy"]["acc"] == 0.25
    assert c["license"] == "llama2" and "Acceptable Use Policy" in c["intended_use"]
    assert c["limitations"] and any(f["path"] == "model.safetensors" or f["path"].endswith(".safetensors") for f in c["files"])
    # the openness report: 14 dimensions, in the index's order, each rated with evidence
    assert [r["dimension"] for r in c["openness"]] == [t for _, t, _ in DIMENSIONS]
    assert all(r["status"] in ("open", "partial", "closed") and r["evidence"] for r in c["openness"])
    assert _status(c, "LLM data")["status"] == "closed"       # Llama 2's pretraining data is not public
    assert _status(c, "License")["status"] == "partial"
    assert _status(c, "Model card")["status"] == "open"
    assert _status(c, "Preprint")["status"] == "open" and "2307.09288" in _status(c, "Preprint")["evidence"]
    text = md.read_text()
    for section in ("## Architecture", "## Training data", "## Training configuration", "## Loss curve",
                    "## Evaluation", "## Safety evaluation", "## Intended use", "## Limitations", "## Openness"):
        assert section in text, section
    assert files[str(jsonl)]["sha256"][:16] in text and "arc_easy.acc" in text


def test_from_scratch_open_run_is_open(tmp_path, make_checkpoint, tiny_tokenizer):
    ckpt, model = make_checkpoint("meta", tokenizer=tiny_tokenizer)
    jsonl, _ = _data(tmp_path)
    _, js = write_model_card(ckpt, produced_by="pretrain", args=model.args, license="apache-2.0",
                             data_files=[{"path": str(jsonl), "source": "karpathy/char-rnn tinyshakespeare", "role": "pretrain"}])
    c = json.loads(js.read_text())
    for title in ("Open code", "LLM data", "LLM weights", "License", "Architecture", "Model card", "Datasheet", "API"):
        assert _status(c, title)["status"] == "open", title
    assert _status(c, "RL data")["status"] == "closed"   # no tuning step: nothing to share, never over-claimed
    assert _status(c, "Paper")["status"] == "closed"


def test_card_without_data_or_args_reads_the_folder(make_checkpoint, tiny_tokenizer):
    ckpt, model = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    (ckpt / "README.md").write_text("---\nlicense: llama2\n---\n")
    _, js = write_model_card(ckpt, produced_by="quantize", base_model="Llama-2-7b-chat")
    c = json.loads(js.read_text())
    assert c["parameters"] == model.args.n_params and c["license"] == "llama2"
    assert c["data_files"] == [] and "No safety evaluation" in " ".join(c["limitations"])


def test_card_command_regenerates(tmp_path, make_checkpoint, tiny_tokenizer, capsys):
    ckpt, model = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    jsonl, _ = _data(tmp_path)
    _, js = write_model_card(ckpt, produced_by="finetune", base_model="SmolLM2-135M", args=model.args,
                             data_files=[str(jsonl)], license="apache-2.0")
    before = json.loads(js.read_text())
    (ckpt / CARD_MD).unlink()
    (ckpt / OPENNESS_MD).unlink()
    (ckpt / "eval_results.json").write_text(json.dumps({"piqa": {"acc": 0.6}}))
    assert card(str(ckpt)) == 0
    assert "openness:" in capsys.readouterr().out
    after = json.loads(js.read_text())
    assert (ckpt / CARD_MD).is_file() and (ckpt / OPENNESS_MD).is_file()
    assert after["created"] == before["created"] and after["data_files"] == before["data_files"]
    assert after["evaluation"] == {"piqa": {"acc": 0.6}} and after["architecture"] == before["architecture"]
    assert "piqa.acc" in (ckpt / CARD_MD).read_text()


def test_card_command_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        card(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        card(str(tmp_path))                      # an empty folder: nothing to describe
    (tmp_path / CARD_JSON).write_text("{not json")
    with pytest.raises(ValueError):
        card(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "missing", produced_by="pretrain")


def test_openness_report_unknown_base_is_conservative():
    rows = openness_report({"produced_by": "merge", "base_model": "some/unknown-model", "license": None,
                            "architecture": None, "data_files": []})
    st = {r["key"]: r["status"] for r in rows}
    assert st["llm_data"] == "closed" and st["license"] == "closed" and st["architecture"] == "partial"
    assert len(rows) == 14


def test_loss_chart_is_linked_and_summarised_from_the_training_log(make_checkpoint, tiny_tokenizer):
    ckpt, model = make_checkpoint("hf", tokenizer=tiny_tokenizer)
    (ckpt / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (ckpt / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 6.0}, {"step": 2, "val_loss": 5.9}, {"step": 3, "loss": 4.5})))
    md, js = write_model_card(ckpt, produced_by="pretrain", args=model.args, loss_curve="loss_curve.png")
    lc = json.loads(js.read_text())["loss_curve"]
    assert lc["kind"] == "chart" and lc["file"] == "loss_curve.png" and lc["data"] == "train_log.jsonl"
    assert (lc["points"], lc["first_loss"], lc["last_loss"]) == (2, 6.0, 4.5)
    assert "![loss curve](loss_curve.png)" in md.read_text()
