"""The openness report of a model card: the 14 dimensions of Liesenfeld & Dingemanse's openness index
(FAccT 2024), each open / partial / closed with the evidence llamaforge has about the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
OPENNESS_MD = "OPENNESS.md"
INDEX_REF = ("Liesenfeld & Dingemanse, \"Rethinking open source generative AI: open-washing and the EU AI Act\", "
             "FAccT 2024 (the European Open Source AI Index)")

# Licences the Open Source Initiative approves (lower-case SPDX ids), plus open data licences.
OPEN_LICENSES = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "isc", "mpl-2.0", "gpl-2.0", "gpl-3.0",
                 "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "unlicense", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "openrail"}

# (dimension key, title, group) in the index's order
DIMENSIONS: list[tuple[str, str, str]] = [
    ("open_code", "Open code", "availability"),
    ("llm_data", "LLM data", "availability"),
    ("llm_weights", "LLM weights", "availability"),
    ("rl_data", "RL data", "availability"),
    ("rl_weights", "RL weights", "availability"),
    ("license", "License", "availability"),
    ("code_documentation", "Code documentation", "documentation"),
    ("architecture", "Architecture", "documentation"),
    ("preprint", "Preprint", "documentation"),
    ("paper", "Paper", "documentation"),
    ("model_card", "Model card", "documentation"),
    ("datasheet", "Datasheet", "documentation"),
    ("package", "Package", "access"),
    ("api", "API", "access"),
]
RANK = {"closed": 0, "partial": 1, "open": 2}

# What is publicly known about base models llamaforge users start from (matched on the name).
# Each entry rates the base model's own part of a dimension, with the evidence.
BASE_MODELS: dict[str, dict[str, tuple[str, str]]] = {
    "llama-2": {
        "open_code": ("closed", "Meta released inference code only; Llama 2's pretraining and RLHF code is not public"),
        "llm_data": ("closed", "the 2T-token pretraining corpus is described only as 'publicly available sources'"),
        "rl_data": ("closed", "Llama 2-Chat's SFT and RLHF preference data are not released"),
        "code_documentation": ("partial", "the reference inference code is documented; training code is not public"),
        "preprint": ("open", "Touvron et al. 2023, 'Llama 2: Open Foundation and Fine-Tuned Chat Models', arXiv:2307.09288"),
        "paper": ("closed", "no peer-reviewed paper"),
        "datasheet": ("closed", "no datasheet for the pretraining data"),
        "license": ("partial", "Llama 2 Community License: use restrictions (Acceptable Use Policy) and a 700M-user clause"),
    },
    "smollm2": {
        "open_code": ("open", "Hugging Face published SmolLM2's training code and configurations"),
        "llm_data": ("open", "the pretraining data (FineWeb-Edu, DCLM, The Stack, SmolLM corpus) is public"),
        "rl_data": ("partial", "instruction and preference data sets are public; the exact mix is described in the preprint"),
        "code_documentation": ("open", "the training repositories are documented"),
        "preprint": ("open", "Ben Allal et al. 2025, 'SmolLM2: When Smol Goes Big', arXiv:2502.02737"),
        "paper": ("closed", "no peer-reviewed paper known to llamaforge"),
        "datasheet": ("partial", "dataset cards on the Hugging Face Hub"),
        "license": ("open", "Apache-2.0"),
    },
}


def _base_facts(base_model: str | None) -> dict[str, tuple[str, str]]:
    if not base_model:
        return {}
    key = base_model.lower().replace("_", "-").replace(" ", "-")
    if "llama-2" in key or "llama2" in key or "llamaguard-7b" in key:
        return BASE_MODELS["llama-2"]
    if "smollm2" in key:
        return BASE_MODELS["smollm2"]
    return {}


def _data_openness(files: list[dict]) -> tuple[str, str]:
    if not files:
        return "closed", "no data files recorded"
    sourced = [f for f in files if f.get("source") or f.get("url")]
    hashed = [f for f in files if f.get("sha256")]
    if len(sourced) == len(files) and len(hashed) == len(files):
        return "open", f"{len(files)} data file(s) listed with sha256, record counts and public source"
    if hashed:
        return "partial", (f"{len(hashed)} of {len(files)} data file(s) identified by sha256 and record count; "
                           f"{len(sourced)} name a public source")
    return "closed", "data files named but not found"


def _combine(this: tuple[str, str], base: tuple[str, str] | None) -> tuple[str, str]:
    """A dimension covering both the base model and this run: open only when both parts are open,
    closed only when both are closed, partial otherwise."""
    if base is None:
        return this
    status = this[0] if this[0] == base[0] else "partial"
    return status, f"this run: {this[1]}; base model: {base[1]}"


def license_status(license: str | None) -> tuple[str, str]:
    if not license:
        return "closed", "no licence identified"
    lic = license.lower()
    if lic in OPEN_LICENSES:
        return "open", f"{license} (OSI-approved / open licence)"
    if lic == "llama2":
        return "partial", "Llama 2 Community License: use restrictions (Acceptable Use Policy) and a 700M-user clause"
    return "partial", f"{license}: not an OSI-approved licence known to llamaforge"


def openness_report(card: dict[str, Any]) -> list[dict[str, str]]:
    """The 14 dimensions, each {"dimension", "group", "status", "evidence"}, from a model card dict."""
    base = _base_facts(card.get("base_model"))
    from_scratch = not card.get("base_model")
    files = card.get("data_files") or []
    default_role = "pretrain" if "pretrain" in (card.get("method") or card.get("produced_by") or "") else "tune"
    pretrain_files = [f for f in files if f.get("role", default_role) == "pretrain"]
    tune_files = [f for f in files if f not in pretrain_files]
    method = (card.get("method") or card.get("produced_by") or "").lower()
    tuned = any(k in method for k in ("finetune", "sft", "lora", "dpo", "rlhf", "ppo", "align", "instruct"))
    lic_status = license_status(card.get("license"))
    version = card.get("llamaforge_version", "")
    rows: dict[str, tuple[str, str]] = {}

    code = ("open", f"produced by `{card.get('produced_by')}` with llamaforge {version} (Apache-2.0 source, "
                    "configuration recorded in model_card.json)")
    rows["open_code"] = code if from_scratch else _combine(code, base.get("open_code", ("closed", "unknown base model training code")))

    if from_scratch:
        rows["llm_data"] = _data_openness(pretrain_files or files)
    else:
        rows["llm_data"] = base.get("llm_data", ("closed", f"pretraining data of {card.get('base_model')} is not known to llamaforge"))

    weights_here = any(Path(card.get("directory", ".")).glob(p) for p in ("*.safetensors", "*.gguf", "*.pth")) if card.get("directory") else True
    if lic_status[0] == "open":
        rows["llm_weights"] = ("open", f"weights written with this card, licence {card.get('license')}")
    else:
        rows["llm_weights"] = ("partial", f"weights written with this card under a restrictive or unknown licence ({card.get('license') or 'unknown'})")
    if not weights_here:
        rows["llm_weights"] = ("closed", "no weight files found next to the card")

    if tuned:
        rows["rl_data"] = _data_openness(tune_files or files)
        rows["rl_weights"] = rows["llm_weights"]
    else:
        rl = base.get("rl_data")
        rows["rl_data"] = rl or ("closed", "no instruction or preference tuning step in this run; no such data to share")
        rows["rl_weights"] = ("closed", "no instruction or preference tuning step in this run") if not rl else (
            "partial" if rows["llm_weights"][0] != "closed" else "closed", "tuned weights of the base model, under its licence")

    rows["license"] = lic_status
    docs = ("open", "llamaforge's code is documented (README, docs/, docstrings); the command and options of this run are recorded")
    rows["code_documentation"] = docs if from_scratch else _combine(docs, base.get("code_documentation"))
    if card.get("architecture"):
        rows["architecture"] = ("open", "full hyperparameters in model_card.json; the Transformer is llamaforge/model.py")
    else:
        rows["architecture"] = ("partial", "architecture not recorded in this card")
    extra = card.get("extra") or {}
    rows["preprint"] = ("open", str(extra["preprint"])) if extra.get("preprint") else base.get(
        "preprint", ("closed", "no preprint describes this run"))
    rows["paper"] = ("open", str(extra["paper"])) if extra.get("paper") else base.get(
        "paper", ("closed", "no peer-reviewed paper describes this run"))
    rows["model_card"] = ("open", f"{CARD_MD} and {CARD_JSON} written with the checkpoint")
    ds = _data_openness(files)
    datasheet = ("open" if ds[0] == "open" else "partial" if files else "closed",
                 "data files with sha256, sizes and record counts in model_card.json" if files else "no data recorded")
    rows["datasheet"] = datasheet if from_scratch else _combine(datasheet, base.get("datasheet"))
    rows["package"] = ("partial", "loadable with the llamaforge package (`Llama.load(DIR)`); the checkpoint itself is not published as a package")
    rows["api"] = ("open", "`llamaforge serve DIR` gives a self-hosted OpenAI-compatible API")
    return [{"dimension": title, "key": key, "group": group, "status": rows[key][0], "evidence": rows[key][1]}
            for key, title, group in DIMENSIONS]


def markdown_table(rows: Iterable[Iterable[Any]], header: list[str]) -> str:
    """A Markdown table; cells escaped so that a '|' or newline in a value keeps the layout."""
    def cell(v: Any) -> str:
        return str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def render_openness(card: dict[str, Any]) -> str:
    """OPENNESS.md of a card."""
    rows = card.get("openness") or []
    counts = {s: sum(r["status"] == s for r in rows) for s in ("open", "partial", "closed")}
    return (f"# Openness report: {card.get('name')}\n\n"
            f"On the 14 dimensions of {INDEX_REF}, filled in by llamaforge from what it knows about this run "
            f"(`llamaforge card DIR` regenerates it).\n\n"
            f"**{counts['open']} open, {counts['partial']} partial, {counts['closed']} closed.**\n\n"
            + markdown_table([(r["dimension"], r["group"], r["status"], r["evidence"]) for r in rows],
                     ["dimension", "group", "status", "evidence"]) + "\n")
