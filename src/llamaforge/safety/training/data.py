"""The guard's data set: harmful and benign rows from the shared data folder and the hand-written
prompts, their held-out split, category labels, and cross-validation folds grouped by topic."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...paths import data_dir

HERE = Path(__file__).resolve().parents[1]
HARD_PROMPTS = HERE / "data" / "hard_prompts.csv"
# more hand-written prompts, training only; none may share a focus word with a held-out group
EXTRA_PROMPTS = HERE / "data" / "hard_prompts_extra.csv"
# hand-written French, Spanish and German requests and their benign twins, training only (issue 18)
MULTILINGUAL_PROMPTS = HERE / "data" / "multilingual_prompts.csv"
SEED = 1234


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


HAND_WRITTEN = ("hard-prompts", "extra-prompts", "multilingual-prompts")


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


def load_examples(folder: Path | None = None, hard_prompts: Path = HARD_PROMPTS,
                  n_benign: int = 400, extra_prompts: Path | None = EXTRA_PROMPTS,
                  multilingual_prompts: Path | None = MULTILINGUAL_PROMPTS) -> list[Example]:
    """Every training and held-out example, with its split."""
    d = Path(folder) if folder is not None else data_dir()
    if not (d / "safety").is_dir():
        raise FileNotFoundError(f"{d}/safety: the harmful-prompt files are missing (see its README.md)")
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
        ex += _hand_written(extra_prompts, "extra-prompts", held_out_focus)
    if multilingual_prompts is not None and Path(multilingual_prompts).exists():
        # a safe row on a held-out topic would be a translated sibling of a held-out hard-benign
        # prompt; harmful rows on those topics are allowed, as in hard_prompts.csv's training side
        ex += _hand_written(multilingual_prompts, "multilingual-prompts", held_out_focus, harmful_may_share=True)
    return ex


def _hand_written(path: Path, source: str, held_out_focus: set[str], harmful_may_share: bool = False) -> list[Example]:
    """A hand-written training file's rows. None may share a held-out topic (with
    `harmful_may_share`, only safe ones may not): a held-out prompt's sibling would leak into training."""
    ex = []
    for r in _read_csv(path):
        harmful = r["label"] == "unsafe"
        if (not harmful or not harmful_may_share) and any(_same_topic(r["focus"], h) for h in held_out_focus):
            rows = "safe training rows" if harmful_may_share else "they are training data and"
            raise ValueError(f"{path}: {r['id']} has the held-out focus {r['focus']!r}; "
                             f"{rows} must not share a held-out topic")
        kind = "response" if r["type"] in ("refusal", "answer") else "prompt"
        ex.append(Example(r["prompt"], harmful, source, "train", [r["note"]] if harmful and r["note"] else [],
                          kind=kind, group=r["type"], focus=r["focus"].strip().lower()))
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


def count_by(examples: list[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        key = e.source + ("+" if e.harmful else "-")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))



# -- more sources for leave-one-source-out evaluation (never in the shipped guard's training) ---------
EVASION_PROMPTS = HERE / "data" / "evasion_prompts.csv"
# OpenAI moderation labels -> O-codes (sexual, sexual/minors; hate, hate/threatening, harassment,
# violence, violence/graphic; self-harm)
_OPENAI = {"S": "O2", "S3": "O2", "H": "O1", "H2": "O1", "HR": "O1", "V": "O1", "V2": "O1", "SH": "O6"}


def load_openai_moderation(folder: Path | None = None) -> list[Example]:
    """OpenAI's moderation samples: harmful when any category is 1; texts with an unknown label
    (a key absent) and no positive one are left out rather than guessed safe."""
    path = (Path(folder) if folder is not None else data_dir()) / "safety" / "openai_moderation_samples.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (see the shared data folder's README.md)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for r in rows:
        pos = sorted({_OPENAI[k] for k in _OPENAI if r.get(k) == 1})
        if not pos and any(k not in r for k in _OPENAI):
            continue
        group = ",".join(k for k in _OPENAI if r.get(k) == 1) or "none"
        out.append(Example(r["prompt"], bool(pos), "openai-moderation", "loso", pos, group=group))
    return out


def load_evasion(path: Path = EVASION_PROMPTS) -> list[Example]:
    """The hand-written evasion set: harmful and benign requests, each plain and in five disguises
    (``group`` is the kind: plain, leetspeak, spacing, invisible, encoded, framing)."""
    return [Example(r["prompt"], r["label"] == "unsafe", "evasion-prompts", "loso",
                    [r["note"]] if r["note"] else [], group=r["type"], focus=r["focus"].strip().lower())
            for r in _read_csv(path)]


TRANSLATED_PROMPTS = HERE / "data" / "translated_prompts.csv"


def load_translated(path: Path = TRANSLATED_PROMPTS) -> list[Example]:
    """The hand-written evaluation set in English, French, Spanish and German (never trained on):
    ``group`` is the language (the file's ``kind`` column: request, scary or plain benign)."""
    return [Example(r["prompt"], r["label"] == "unsafe", "translated-prompts", "loso",
                    [r["note"]] if r["note"] else [], group=r["lang"],
                    focus=r["focus"].strip().lower())
            for r in _read_csv(path)]


def loso_source(e: Example) -> str:
    """The source a row belongs to for leave-one-source-out: one name per public data set (its
    train, test and answer rows together) and per hand-written file."""
    s = e.source.split(":")[0]
    for prefix in ("advbench", "self-instruct", "gsm8k"):
        if s.startswith(prefix):
            return prefix
    return "arc" if s.startswith("arc-") else s


def load_loso_examples(folder: Path | None = None) -> list[Example]:
    """Every row of every source, for leave-one-source-out: the guard's training and held-out rows,
    OpenAI's moderation samples, the evasion set and the translated set (scored, never trained on:
    `crossval.SCORE_ONLY`)."""
    return load_examples(folder) + load_openai_moderation(folder) + load_evasion() + load_translated()
