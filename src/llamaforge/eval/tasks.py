"""Evaluation tasks: one small class per family.

Each task reads its file, builds requests for the `LM` in harness.py, and turns the answers into
metrics. Prompt formats follow lm-evaluation-harness (the reference people compare against):

- multiple choice: context "Question: ...\\nAnswer:", continuation " " + choice; `acc` picks the
  choice with the highest summed log-likelihood, `acc_norm` the highest log-likelihood divided by
  the choice's length in characters (lm-eval's `len(choice)`, not tokens, not bytes); ties go to
  the first choice (numpy argmax).
- WinoGrande: partial scoring, the shared continuation scored after each filled-in context.
- HellaSwag: lm-eval's preprocessing of the official jsonl (activity label, ctx_a + ctx_b, [title]
  markers and bracketed artefacts removed).
- LAMBADA: last-word accuracy (greedy decoding reproduces every target token) and lm-eval's
  perplexity, exp(-mean over examples of the target's log-likelihood).
- raw-text perplexity: sliding window with stride; per token, per byte, bits per byte and per word.
- GSM8K: k-shot "Question: ...\\nAnswer: ..." prompts from the train file, greedy, exact match of the
  final number (strict: after "####"; flexible: the last number in the answer).
- safety: refusal rate judged by `is_refusal` over greedy chat answers, and the guard's flag rate.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..paths import data_dir
from .base import Task, read_jsonl, require
from .safety_tasks import GuardHeldOut, Refusal, XSTest


@dataclass
class Choice:
    """One multiple-choice example: a context per choice (shared or not) and a continuation per choice."""
    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_lens: list[int]      # characters acc_norm divides by


def mc_metrics(examples: Sequence[Choice], lls: Sequence[Sequence[float]], norm: bool = True) -> tuple[dict, list]:
    acc, acc_norm, records = [], [], []
    for ex, ll in zip(examples, lls):
        ll = np.asarray(ll, dtype=np.float64)
        pred = int(np.argmax(ll))
        pred_norm = int(np.argmax(ll / np.asarray(ex.norm_lens, dtype=np.float64)))
        acc.append(pred == ex.gold)
        acc_norm.append(pred_norm == ex.gold)
        records.append({"gold": ex.gold, "pred": pred, "pred_norm": pred_norm, "loglik": ll.tolist()})
    m: dict[str, Any] = {"acc": float(np.mean(acc))}
    if norm:
        m["acc_norm"] = float(np.mean(acc_norm))
    m["n"] = len(examples)
    return m, records


class MultipleChoice(Task):
    """`{"query","choices","gold"}` (llm-foundry's local_data): lm-eval's "Question: ...\\nAnswer:" + " choice"."""
    file_format = 'jsonl with "query", "choices", "gold"'
    report_norm = True

    def load(self, path: Path) -> list[dict]:
        rows = read_jsonl(path)
        for n, r in enumerate(rows, 1):
            require(r, ("query", "choices", "gold"), path, n)
            if not isinstance(r["choices"], list) or not 0 <= int(r["gold"]) < len(r["choices"]):
                raise ValueError(f"{path}: example {n}: gold {r['gold']!r} is not an index into choices")
        return rows

    def context(self, row: dict) -> str:
        # llm-foundry's query is "Question: ...", PIQA's with a trailing newline; lm-eval's prompt
        # is "Question: {question}\nAnswer:" followed by " " + choice
        query = row["query"][:-1] if row["query"].endswith("\n") else row["query"]
        if not query.startswith("Question:"):
            query = "Question: " + query
        return query + "\nAnswer:"

    def example(self, row: dict, fewshot: str) -> Choice:
        ctx = fewshot + self.context(row)
        choices = [str(c) for c in row["choices"]]
        return Choice([ctx] * len(choices), [" " + c for c in choices], int(row["gold"]), [len(c) for c in choices])

    def solved(self, row: dict) -> str:
        """The example with its answer, as a few-shot demonstration."""
        return self.context(row) + " " + str(row["choices"][int(row["gold"])])

    def run(self, lm, path, cfg):
        rows = self.load(path)
        todo = rows[:cfg.limit] if cfg.limit else rows
        rng = random.Random(cfg.seed)
        examples = []
        for i, r in enumerate(todo):
            fewshot = ""
            if cfg.shots:
                # no train split here: demonstrations come from the same file, never the example itself
                pool = [j for j in rng.sample(range(len(rows)), min(len(rows), cfg.shots + 1)) if j != i][:cfg.shots]
                fewshot = "".join(self.solved(rows[j]) + "\n\n" for j in pool)
            examples.append(self.example(r, fewshot))
        pairs = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
        flat = lm.loglikelihood(pairs, desc=self.name)
        lls, k = [], 0
        for ex in examples:
            lls.append([ll for ll, _ in flat[k:k + len(ex.continuations)]])
            k += len(ex.continuations)
        metrics, records = mc_metrics(examples, lls, self.report_norm)
        metrics["shots"] = cfg.shots
        return metrics, records


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow "[title]" markers become ". ", other [tags] go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoice):
    """Official HellaSwag jsonl (`ctx` or `ctx_a`/`ctx_b`, `activity_label`, `endings`, `label`)."""
    name = "hellaswag"
    default_file = "eval/hellaswag.jsonl"
    file_format = 'official HellaSwag jsonl with "ctx" (or "ctx_a"/"ctx_b"), "endings", "label"'

    def load(self, path):
        rows = read_jsonl(path)
        out = []
        for n, r in enumerate(rows, 1):
            if "query" in r:     # already in the multiple-choice form
                require(r, ("query", "choices", "gold"), path, n)
                out.append({"query": r["query"], "choices": r["choices"], "gold": int(r["gold"])})
                continue
            require(r, ("endings", "label"), path, n)
            if "ctx_a" in r:
                ctx = r["ctx_a"] + " " + r.get("ctx_b", "").capitalize()
            else:
                require(r, ("ctx",), path, n)
                ctx = r["ctx"]
            label = r.get("activity_label")
            query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
            gold = int(r["label"])
            if not 0 <= gold < len(r["endings"]):
                raise ValueError(f"{path}: example {n}: label {gold} is not an index into endings")
            out.append({"query": query, "choices": [hellaswag_preprocess(e) for e in r["endings"]], "gold": gold})
        return out

    def context(self, row):
        return row["query"]


class WinoGrande(MultipleChoice):
    """`{"context_options","continuation","gold"}`: partial scoring of the continuation after each context."""
    name = "winogrande"
    default_file = "eval/winogrande.jsonl"
    file_format = 'jsonl with "context_options", "continuation", "gold"'
    report_norm = False     # lm-eval reports acc only for WinoGrande

    def load(self, path):
        rows = read_jsonl(path)
        for n, r in enumerate(rows, 1):
            require(r, ("context_options", "continuation", "gold"), path, n)
        return rows

    def example(self, row, fewshot):
        opts = [fewshot + c for c in row["context_options"]]
        cont = " " + row["continuation"].strip()
        return Choice(opts, [cont] * len(opts), int(row["gold"]), [len(c) for c in row["context_options"]])

    def solved(self, row):
        return row["context_options"][int(row["gold"])] + " " + row["continuation"].strip()


# -- language modelling -----------------------------------------------------------------------
class Lambada(Task):
    """`{"context","continuation"}`: last-word accuracy and perplexity (lm-eval's lambada_openai)."""
    name = "lambada_openai"
    default_file = "eval/lambada_openai.jsonl"
    file_format = 'jsonl with "context", "continuation"'

    def run(self, lm, path, cfg):
        rows = read_jsonl(path)
        for n, r in enumerate(rows, 1):
            require(r, ("context", "continuation"), path, n)
        rows = rows[:cfg.limit] if cfg.limit else rows
        pairs = [(r["context"].rstrip(" "), " " + r["continuation"].strip()) for r in rows]
        res = lm.loglikelihood(pairs, desc=self.name)
        lls = [ll for ll, _ in res]
        metrics = {"acc": float(np.mean([g for _, g in res])), "ppl": math.exp(-float(np.mean(lls))),
                   "n": len(rows), "shots": 0}
        return metrics, [{"loglik": ll, "greedy": g} for ll, g in res]


class Perplexity(Task):
    """Raw text: sliding-window perplexity per token, per byte (and bits per byte), per word."""
    name = "wikitext2"
    default_file = "eval/wikitext2_test.raw"
    file_format = "a UTF-8 text file"

    def run(self, lm, path, cfg):
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: empty text")
        ids = lm.encode(text, bos=False)
        ll, n_tok = lm.rolling(ids, cfg.window, cfg.stride, limit=cfg.limit, desc=self.name)
        if cfg.limit:   # only part of the text was scored: count its bytes and words
            text = lm.tok.decode(ids[:n_tok])
        n_bytes, n_words = len(text.encode("utf-8")), len(re.split(r"\s+", text))
        metrics = {"token_ppl": math.exp(-ll / n_tok), "byte_ppl": math.exp(-ll / n_bytes),
                   "bits_per_byte": -ll / n_bytes / math.log(2), "word_ppl": math.exp(-ll / n_words),
                   "tokens": n_tok, "bytes": n_bytes, "words": n_words, "window": min(cfg.window, lm.max_len),
                   "stride": cfg.stride, "n": math.ceil(n_tok / cfg.stride)}
        return metrics, []


# -- generation --------------------------------------------------------------------------------
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str) -> str:
    return s.replace(",", "").replace("$", "").strip().rstrip(".")


def gsm8k_answers(text: str) -> tuple[str | None, str | None]:
    """(strict, flexible) final numbers of a GSM8K answer: after "####", and the last number anywhere."""
    strict = _STRICT.search(text)
    nums = [a or b for a, b in _FLEX.findall(text)]
    return (normalize_number(strict.group(1)) if strict else None,
            normalize_number(nums[-1]) if nums else None)


class GSM8K(Task):
    """`{"question","answer"}` with the answer ending "#### N": k-shot, greedy, exact match on N."""
    name = "gsm8k"
    default_file = "eval/gsm8k_test.jsonl"
    train_file = "sft/gsm8k_train.jsonl"
    file_format = 'jsonl with "question", "answer" ending in "#### N"'

    def load(self, path):
        rows = read_jsonl(path)
        for n, r in enumerate(rows, 1):
            require(r, ("question", "answer"), path, n)
            if "####" not in r["answer"]:
                raise ValueError(f"{path}: example {n}: the answer has no '#### N' final number")
        return rows

    def run(self, lm, path, cfg):
        rows = self.load(path)
        rows = rows[:cfg.limit] if cfg.limit else rows
        train: list[dict] = []
        if cfg.shots:
            tp = data_dir() / self.train_file
            if not tp.is_file():
                raise FileNotFoundError(f"gsm8k: few-shot examples come from {tp}, which is missing")
            train = self.load(tp)
        rng = random.Random(cfg.seed)
        prompts = []
        for r in rows:
            demos = rng.sample(train, cfg.shots) if cfg.shots else []
            shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in demos)
            prompts.append(f"{shots}Question: {r['question']}\nAnswer:")
        outs = lm.generate(prompts, max_tokens=cfg.max_tokens or 256, stop=GSM8K_STOP, desc=self.name)
        strict_ok, flex_ok, records = [], [], []
        for r, out in zip(rows, outs):
            target = normalize_number(r["answer"].split("####")[-1])
            strict, flex = gsm8k_answers(out)
            strict_ok.append(strict == target)
            flex_ok.append(flex == target)
            records.append({"target": target, "strict": strict, "flexible": flex, "output": out})
        metrics = {"exact_match": float(np.mean(strict_ok)), "exact_match_flexible": float(np.mean(flex_ok)),
                   "n": len(rows), "shots": cfg.shots}
        return metrics, records


def on_file(family: type[Task], name: str, default_file: str) -> type[Task]:
    """A task of ``family`` (same prompts, same metrics) named ``name``, reading ``default_file`` of
    the shared data folder unless --data names another."""
    return type(name, (family,), {"name": name, "default_file": default_file})


ARCEasy = on_file(MultipleChoice, "arc_easy", "eval/arc_easy.jsonl")
ARCChallenge = on_file(MultipleChoice, "arc_challenge", "eval/arc_challenge.jsonl")
PIQA = on_file(MultipleChoice, "piqa", "eval/piqa.jsonl")
AdvBench = on_file(Refusal, "advbench", "safety/advbench_harmful_behaviors.csv")
StrongREJECT = on_file(Refusal, "strongreject", "safety/strongreject.csv")
HarmBench = on_file(Refusal, "harmbench", "safety/harmbench_behaviors_text_val.csv")

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    ARCEasy, ARCChallenge, PIQA, WinoGrande, HellaSwag, Lambada, Perplexity, GSM8K,
    AdvBench, StrongREJECT, HarmBench, XSTest, Refusal, GuardHeldOut)}
ALIASES = {"lambada": "lambada_openai", "wikitext": "wikitext2", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[key]()
