"""Model cards and openness reports for every checkpoint llamaforge writes.

`write_model_card(directory, produced_by=..., ...)` writes three files next to the weights:
- ``model_card.json``: the machine-readable record (base model, architecture, parameter count, data
  files with sha256 and record counts, training configuration, loss curve, evaluation and safety
  results, licence, intended use and limitations, openness report);
- ``MODEL_CARD.md``: the same for people;
- ``OPENNESS.md``: the openness report on the 14 dimensions of Liesenfeld & Dingemanse's openness
  index (FAccT 2024, "Rethinking open source generative AI"), each open / partial / closed with the
  evidence llamaforge has about the run (rated in `openness.py`).

`llamaforge card DIR` regenerates all three from ``model_card.json`` and what is in the folder.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from . import config as cfg
from .config import ModelArgs
from .fileio import atomic_write_text
from .formats import load_checkpoint
from .openness import (CARD_JSON, CARD_MD, INDEX_REF, OPENNESS_MD, markdown_table, openness_report,
                       render_openness)
from .safety.license import declared_license, detect_license, normalise

log = logging.getLogger(__name__)

SCHEMA = "llamaforge-model-card/1"
# -- facts about files ---------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def count_records(path: Path) -> int | None:
    """Records in a data file: JSON lines, CSV rows (without header), text lines, tokens of a .bin/.npy."""
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz", ".txt", ".raw", ".txt.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                return sum(1 for line in f if line.strip())
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                return max(sum(1 for _ in csv.reader(f)) - 1, 0)
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
        if name.endswith(".npy"):
            return int(np.load(path, mmap_mode="r").size)
        if name.endswith(".bin"):
            return path.stat().st_size // 2  # pretokenized uint16 ids
    except (OSError, ValueError, UnicodeError) as e:
        log.info("cannot count records of %s: %s", path, e)
    return None


def describe_data_file(item: Any) -> dict[str, Any]:
    """A data file entry: path, sha256, bytes, records (+ any fields given, e.g. source, role)."""
    entry: dict[str, Any] = dict(item) if isinstance(item, dict) else {"path": str(item)}
    if "path" not in entry:
        raise ValueError(f"data file entry {item!r} has no 'path'")
    p = Path(entry["path"])
    entry["path"] = str(p)
    if p.is_file():
        entry.setdefault("sha256", sha256_file(p))
        entry.setdefault("bytes", p.stat().st_size)
        if entry.get("records") is None:
            entry["records"] = count_records(p)
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p)}\0{sha256_file(f)}\n".encode())
        entry.setdefault("sha256", h.hexdigest())
        entry.setdefault("bytes", sum(f.stat().st_size for f in files))
        entry.setdefault("files", len(files))
    else:
        entry.setdefault("missing", True)
    return entry


def summarise_loss_curve(loss_curve: str | None, directory: Path) -> dict[str, Any] | None:
    """The loss curve as a file reference plus first/last/min loss when the file holds numbers."""
    if not loss_curve:
        return None
    p = Path(loss_curve)
    full = p if p.is_absolute() else directory / p
    out: dict[str, Any] = {"file": _relative(full, directory) if full.exists() else str(loss_curve)}
    if full.suffix.lower() in (".png", ".svg", ".jpg", ".pdf"):
        out["kind"] = "chart"
        # the numbers behind the chart: a same-named CSV/JSONL, or the trainer's train_log.jsonl
        for sib in (full.with_suffix(".csv"), full.with_suffix(".jsonl"), full.parent / "train_log.jsonl",
                    full.parent.parent / "train_log.jsonl"):
            if sib.exists():
                full = sib
                out["data"] = _relative(sib, directory)
                break
        else:
            return out
    steps, losses = _read_losses(full)
    if losses:
        out.update({"points": len(losses), "first_step": steps[0], "last_step": steps[-1],
                    "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                    "min_loss": round(min(losses), 4)})
    return out


def _read_losses(path: Path) -> tuple[list, list[float]]:
    steps: list = []
    losses: list[float] = []
    if not path.is_file():
        return steps, losses
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                for i, row in enumerate(csv.DictReader(f)):
                    if row.get("loss") not in (None, ""):
                        steps.append(int(float(row.get("step") or i)))
                        losses.append(float(row["loss"]))
        elif path.suffix in (".jsonl", ".json"):
            lines = path.read_text().splitlines()
            rows = json.loads("\n".join(lines)) if path.suffix == ".json" else [json.loads(x) for x in lines if x.strip()]
            for i, row in enumerate(rows if isinstance(rows, list) else []):
                if isinstance(row, dict) and row.get("loss") is not None:
                    steps.append(int(row.get("step", i)))
                    losses.append(float(row["loss"]))
    except (ValueError, OSError, json.JSONDecodeError) as e:
        log.info("cannot read losses from %s: %s", path, e)
    return steps, losses


def _relative(p: Path, directory: Path) -> str:
    try:
        return str(p.resolve().relative_to(directory.resolve()))
    except ValueError:
        return str(p)


# -- reading what is in a checkpoint folder ------------------------------------------------------

def _args_from_folder(directory: Path):
    """ModelArgs from params.json / config.json / a GGUF header, without loading the weights."""
    try:
        if (directory / "params.json").is_file():
            return cfg.from_params_json(cfg.load_json(directory / "params.json"))
        if (directory / "config.json").is_file():
            return cfg.from_hf_config(cfg.load_json(directory / "config.json"))
        ggufs = sorted(directory.glob("*.gguf")) if directory.is_dir() else ([directory] if directory.suffix == ".gguf" else [])
        if len(ggufs) == 1:
            return load_checkpoint(ggufs[0], dequantize=False).args
    except Exception as e:  # noqa: BLE001 - a card is still written without the architecture
        log.info("cannot read the architecture from %s: %s", directory, e)
    return None


def _license_from_folder(directory: Path, base_model: str | None) -> str | None:
    return detect_license(declared_license(directory), folders=[directory, directory.parent], names=[base_model])


def _weight_files(directory: Path) -> list[Path]:
    pats = ("*.safetensors", "*.gguf", "*.pth", "*.bin", "*.model", "tokenizer.json")
    return sorted({f for pat in pats for f in directory.glob(pat) if f.is_file()})


# -- writing -------------------------------------------------------------------------------------

def write_model_card(directory, *, produced_by: str, base_model: str | None = None, args=None,
                     data_files: list | None = None, training_config: dict | None = None,
                     loss_curve: str | None = None, eval_results: dict | None = None,
                     safety_results: dict | None = None, license: str | None = None, method: str | None = None,
                     extra: dict | None = None) -> tuple[Path, Path]:
    """Write MODEL_CARD.md, model_card.json and OPENNESS.md into ``directory``; return (md, json).

    produced_by: the command that made the checkpoint ("pretrain", "finetune", "merge", "quantize", ...)
    data_files: paths, or dicts with "path" (+ "source", "role": "pretrain" | "tune", "records")
    loss_curve: a file in the folder (PNG chart, or CSV/JSONL with step,loss)
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    if not produced_by:
        raise ValueError("produced_by must name the command that made the checkpoint")
    card = build_card(directory, produced_by=produced_by, base_model=base_model, args=args, data_files=data_files,
                      training_config=training_config, loss_curve=loss_curve, eval_results=eval_results,
                      safety_results=safety_results, license=license, method=method, extra=extra)
    return _write(directory, card)


def build_card(directory: Path, *, produced_by: str, base_model: str | None = None, args=None,
               data_files: list | None = None, training_config: dict | None = None, loss_curve: str | None = None,
               eval_results: dict | None = None, safety_results: dict | None = None, license: str | None = None,
               method: str | None = None, extra: dict | None = None, created: str | None = None) -> dict[str, Any]:
    args = args if args is not None else _args_from_folder(directory)
    license = normalise(license) or _license_from_folder(directory, base_model)
    arch = None
    if args is not None:
        arch = {k: v for k, v in args.to_dict().items()}
        arch.update(head_dim=args.head_dim, kv_heads=args.kv_heads, ffn_hidden=args.ffn_hidden)
    card: dict[str, Any] = {
        "schema": SCHEMA,
        "name": (extra or {}).get("name") or directory.resolve().name,
        "produced_by": produced_by,
        "method": method or produced_by,
        "created": created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "llamaforge_version": __version__,
        "base_model": base_model,
        "architecture": arch,
        "parameters": args.n_params if args is not None else None,
        "files": [{"path": _relative(f, directory), "bytes": f.stat().st_size} for f in _weight_files(directory)],
        "data_files": [describe_data_file(d) for d in (data_files or [])],
        "training_config": _jsonable(training_config) if training_config else None,
        "loss_curve": summarise_loss_curve(loss_curve, directory),
        "evaluation": _jsonable(eval_results) if eval_results else None,
        "safety_evaluation": _jsonable(safety_results) if safety_results else None,
        "license": license,
        "intended_use": _intended_use(license, f"`{produced_by}`" + (f" ({method})" if method and method != produced_by else "")),
        "limitations": _limitations(base_model, safety_results),
        "extra": _jsonable(extra) if extra else None,
    }
    card["openness"] = openness_report({**card, "directory": str(directory)})
    return card


def _intended_use(license: str | None, made_by: str) -> str:
    use = ("Research, education and building applications on a small, fully documented language model; "
           f"this checkpoint was made by {made_by}.")
    if license == "llama2":
        use += (" Use is governed by the Llama 2 Community License and must follow Meta's Acceptable Use Policy "
                "(https://ai.meta.com/llama/use-policy/).")
    return use + " Pair it with `--guard` (llamaforge's moderation) in user-facing settings."


def _limitations(base_model: str | None, safety: dict | None) -> list[str]:
    out = ["Can produce false, biased or offensive text; verify facts before relying on them.",
           "Evaluated only on the tasks listed under Evaluation; other uses are untested.",
           "English-centred training data; quality in other languages is lower.",
           "Not suitable for medical, legal or financial advice, or for decisions about people."]
    if not safety:
        out.append("No safety evaluation was run for this checkpoint.")
    if base_model:
        out.append(f"Inherits the limitations and biases of the base model {base_model}.")
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write(directory: Path, card: dict[str, Any]) -> tuple[Path, Path]:
    md_path, json_path, open_path = directory / CARD_MD, directory / CARD_JSON, directory / OPENNESS_MD
    atomic_write_text(json_path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, render_markdown(card))
    atomic_write_text(open_path, render_openness(card))
    return md_path, json_path


# -- Markdown ------------------------------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or not v else f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), d)]


def render_markdown(card: dict[str, Any]) -> str:
    out = [f"# Model card: {card.get('name')}", "",
           f"Written by llamaforge {card.get('llamaforge_version')} on {card.get('created')} "
           f"(`{card.get('produced_by')}`); the machine-readable version is `{CARD_JSON}`.", ""]
    facts = [("produced by", card.get("produced_by")), ("method", card.get("method")),
             ("base model", card.get("base_model") or "none (trained from scratch)"),
             ("parameters", f"{card['parameters']:,}" if card.get("parameters") else "unknown"),
             ("licence", card.get("license") or "unknown")]
    out += ["## Summary", "", markdown_table(facts, ["", ""]), ""]
    if card.get("architecture"):
        out += ["## Architecture", "", "Llama 2 decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).", "",
                markdown_table(card["architecture"].items(), ["hyperparameter", "value"]), ""]
    if card.get("files"):
        out += ["## Files", "", markdown_table(((f["path"], f"{f['bytes']:,}") for f in card["files"]), ["file", "bytes"]), ""]
    out += ["## Training data", ""]
    if card.get("data_files"):
        out.append(markdown_table(((d["path"], d.get("records"), d.get("bytes"), (d.get("sha256") or "")[:16],
                            d.get("source") or "") for d in card["data_files"]),
                          ["file", "records", "bytes", "sha256 (first 16)", "source"]))
        out.append("\nFull sha256 digests are in `model_card.json`.")
    else:
        out.append("No data files recorded (this step did not train on data).")
    out.append("")
    if card.get("training_config"):
        out += ["## Training configuration", "", markdown_table(_flatten(card["training_config"]), ["setting", "value"]), ""]
    lc = card.get("loss_curve")
    if lc:
        out += ["## Loss curve", ""]
        if lc.get("kind") == "chart":
            out.append(f"![loss curve]({lc['file']})")
        else:
            out.append(f"Data: `{lc['file']}`")
        if "last_loss" in lc:
            out.append(f"\n{lc['points']} points, step {lc['first_step']} to {lc['last_step']}: loss "
                       f"{lc['first_loss']} -> {lc['last_loss']} (min {lc['min_loss']}).")
        out.append("")
    out += ["## Evaluation", ""]
    out.append(markdown_table(_flatten(card["evaluation"]), ["task / metric", "value"]) if card.get("evaluation")
               else "Not run. Run `llamaforge evaluate` and regenerate this card.")
    out += ["", "## Safety evaluation", ""]
    out.append(markdown_table(_flatten(card["safety_evaluation"]), ["check", "value"]) if card.get("safety_evaluation")
               else "Not run for this checkpoint.")
    out += ["", "## Intended use", "", card.get("intended_use") or "", "", "## Limitations", ""]
    out += [f"- {x}" for x in card.get("limitations") or []]
    out += ["", "## Openness", ""]
    rows = card.get("openness") or []
    out.append(markdown_table([(r["dimension"], r["status"], r["evidence"]) for r in rows], ["dimension", "status", "evidence"]))
    out += ["", f"Dimensions from {INDEX_REF}; see `{OPENNESS_MD}`.", ""]
    if card.get("extra"):
        out += ["## More", "", markdown_table(_flatten(card["extra"]), ["", ""]), ""]
    return "\n".join(out)


# -- CLI -----------------------------------------------------------------------------------------

def regenerate(directory: str | Path) -> tuple[Path, Path]:
    """Rebuild the card files from model_card.json (when there is one) and what is in the folder."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder")
    old: dict[str, Any] = {}
    if (d / CARD_JSON).is_file():
        try:
            old = json.loads((d / CARD_JSON).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / CARD_JSON}: not valid JSON ({e})") from e
    elif not _weight_files(d):
        raise FileNotFoundError(f"{d}: neither {CARD_JSON} nor checkpoint files found")
    args = None
    if old.get("architecture"):
        init = {f.name for f in dataclasses.fields(ModelArgs) if f.init}
        try:
            args = ModelArgs(**{k: v for k, v in old["architecture"].items() if k in init})
        except (TypeError, ValueError):
            args = None
    lc = old.get("loss_curve") or {}
    files = [{k: v for k, v in f.items() if k not in ("missing",)} for f in old.get("data_files") or []]
    for extra_file, key in (("eval_results.json", "evaluation"), ("safety_results.json", "safety_evaluation")):
        if not old.get(key) and (d / extra_file).is_file():
            old[key] = json.loads((d / extra_file).read_text())
    card = build_card(d, produced_by=old.get("produced_by") or "unknown", base_model=old.get("base_model"),
                      args=args, data_files=files, training_config=old.get("training_config"),
                      loss_curve=lc.get("file"), eval_results=old.get("evaluation"),
                      safety_results=old.get("safety_evaluation"), license=old.get("license"),
                      method=old.get("method"), extra=old.get("extra"), created=old.get("created"))
    return _write(d, card)


def card(directory: str) -> int:
    """Regenerate MODEL_CARD.md, model_card.json and the openness report (OPENNESS.md) of a checkpoint folder.

    directory: a checkpoint folder written by llamaforge (or any checkpoint folder)
    """
    md, js = regenerate(directory)
    card_data = json.loads(js.read_text())
    counts = {s: sum(r["status"] == s for r in card_data["openness"]) for s in ("open", "partial", "closed")}
    print(md)
    print(js)
    print(Path(directory) / OPENNESS_MD)
    print(f"openness: {counts['open']} open, {counts['partial']} partial, {counts['closed']} closed")
    return 0
