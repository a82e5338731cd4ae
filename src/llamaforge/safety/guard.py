"""Moderation: `Guard.load()` then `guard.check(text)` -> Verdict(safe, categories, score).

Two guards behind one API:
- the default: a small classifier shipped in the package (``guard_head.safetensors``), trained by
  ``llamaforge train-guard`` (`safety.training`): the mean of a head over the bundled SmolLM2-135M-Instruct's
  hidden states and a fine-tuned all-MiniLM-L6-v2 with its head; offline, CPU, tens of
  milliseconds per message;
- a real Llama Guard (v1) checkpoint when you pass its path: the Llama Guard prompt
  (``policy.render_prompt``) is run through `llamaforge.api.Llama` and its ``safe`` /
  ``unsafe\\nO1,O3`` answer is parsed; the score is the probability of "unsafe" as first token.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from ..api import Llama
from .encoder import MiniLM
from .head import HEAD_FILE, META_FILE, Head  # noqa: F401  (META_FILE: the guard's files are named here too)
from .lmfeatures import LMFeatures
from .normalise import clean, scored_parts
from .policy import (AUP_URL, DEFAULT_CATEGORIES, LLAMA_GUARD_V1, Category, Role, category_map,
                     conversation_turns, last_turn, make_categories, parse_output, render_prompt)
from .taxonomy import Taxonomy, check_taxonomy, mlcommons_labels

log = logging.getLogger(__name__)

CRISIS_NOTE = ("If you are thinking about harming yourself, please talk to someone you trust or contact a local "
               "crisis line (in the US, call or text 988; elsewhere, findahelpline.com lists services).")


@dataclass
class Verdict:
    """The guard's decision. ``categories`` are labels like "O3: Criminal Planning"."""
    safe: bool
    categories: list[str] = field(default_factory=list)
    score: float = 0.0      # probability that the text is unsafe
    role: Role = "User"

    @property
    def codes(self) -> list[str]:
        return [c.split(":")[0].strip() for c in self.categories]

    def to_dict(self) -> dict[str, Any]:
        return {"safe": self.safe, "categories": self.categories, "score": round(self.score, 4)}


class Guard:
    """A moderation model: check User or Agent turns against a safety taxonomy."""

    def __init__(self, categories: Sequence[Category]):
        self.categories = tuple(categories)

    @classmethod
    def load(cls, path: str | Path | None = None, *, categories: Sequence[Category | str] | None = None,
             threshold: float | None = None) -> "Guard":
        """The shipped classifier (path None, or a guard_head.safetensors), else a Llama Guard checkpoint.

        categories: a custom taxonomy for Llama Guard (names or Category objects); for the classifier,
            the subset of its codes that block (others pass).
        threshold: decision threshold on the unsafe probability (classifier default: the trained one;
            Llama Guard default: its own safe/unsafe answer).
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is not between 0 and 1")
        if path is None or str(path).endswith(".safetensors") or (Path(path) / "guard_head.json").exists():
            head = Path(path) if path is not None else HEAD_FILE
            if head.is_dir():
                head = head / "guard_head.safetensors"
            return ClassifierGuard.load(head, enabled=_codes(categories) if categories else None, threshold=threshold)
        return LlamaGuard.load(path, categories=make_categories(categories) if categories else None, threshold=threshold)

    # -- the API every guard implements ----------------------------------------------------------
    def check(self, text: str | Sequence[dict], role: Role = "User", context: list[dict] | None = None, *,
              taxonomy: Taxonomy = "llama-guard-1") -> Verdict:
        """Is ``text`` (a User prompt or an Agent answer, after ``context`` turns) safe?

        ``text`` may also be a chat conversation (a list of ``{"role", "content"}`` messages): its
        last turn is judged in context, a user message as the prompt, an assistant message as the
        response to it (Llama Guard's prompt and response modes). ``taxonomy="mlcommons"`` names
        the categories with MLCommons' S1-S14 codes instead of Llama Guard v1's O-codes."""
        if not isinstance(text, str):
            if role != "User" or context is not None:
                raise ValueError("pass either messages, or a text with role= and context=, not both")
            text, role, context = last_turn(text)
        return self.relabel(self.check_batch([text], role=role, context=context)[0], text, taxonomy)

    def require_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Raise ValueError unless this guard's verdicts can be named in ``taxonomy``."""
        check_taxonomy(taxonomy)
        known = category_map(DEFAULT_CATEGORIES)
        if taxonomy != "llama-guard-1" and any(known.get(c.code) != c for c in self.categories):
            raise ValueError("taxonomy='mlcommons' maps the Llama Guard v1 categories; this guard has a custom taxonomy")

    def relabel(self, verdict: Verdict, text: str, taxonomy: Taxonomy = "llama-guard-1") -> Verdict:
        """``verdict`` with its categories named in ``taxonomy`` (refined by the checked ``text``)."""
        check_taxonomy(taxonomy)
        if taxonomy == "llama-guard-1" or verdict.safe:
            return verdict
        self.require_taxonomy(taxonomy)
        return replace(verdict, categories=mlcommons_labels(verdict.codes, clean(text)))

    def check_batch(self, texts: Sequence[str], role: Role = "User",
                    context: list[dict] | None = None) -> list[Verdict]:
        raise NotImplementedError

    def refusal(self, verdict: Verdict) -> str:
        """What to show instead of a blocked message: which category, and where the policy is."""
        names = ", ".join(verdict.categories) or "an unsafe category"
        what = "this request" if verdict.role == "User" else "the answer"
        text = (f"I can't help with {what}: it falls under {names}, which the Llama 2 Acceptable Use Policy "
                f"({AUP_URL}) does not allow.")
        if "O6" in verdict.codes or "S11" in verdict.codes:
            text += " " + CRISIS_NOTE
        return text

    def _labels(self, codes: Sequence[str]) -> list[str]:
        known = category_map(self.categories)
        return [known[c].label if c in known else c for c in codes]


def _codes(categories: Sequence[Category | str]) -> set[str]:
    """Category codes from Category objects, codes ("O2") or labels ("O2: Sexual Content")."""
    out = set()
    for c in categories:
        code = c.code if isinstance(c, Category) else str(c).split(":")[0].strip()
        if not code:
            raise ValueError(f"category {c!r}: give a code such as 'O3'")
        out.add(code)
    return out


def _check_role(role: str) -> None:
    if role not in ("User", "Agent"):
        raise ValueError(f"role must be 'User' or 'Agent', not {role!r}")


class ClassifierGuard(Guard):
    """The shipped default: sentence features -> MLP -> P(unsafe) and per-category probabilities,
    averaged over its members: a head over the bundled SmolLM2-135M-Instruct's hidden states
    (`lmfeatures.LMFeatures`) and all-MiniLM-L6-v2 fine-tuned with its own head."""

    def __init__(self, members: Sequence[tuple[Any, torch.nn.Module]], categories: Sequence[Category],
                 threshold: float, enabled: set[str] | None = None):
        super().__init__(categories)
        self.members = list(members)   # (encoder with .embed(texts) -> [N, D], head)
        self.threshold = threshold
        self.enabled = enabled
        self.deobfuscate = True   # score de-obfuscated views too (False: only for measuring their effect)

    @classmethod
    def load(cls, head_file: Path = HEAD_FILE, *, enabled: set[str] | None = None,
             threshold: float | None = None) -> "ClassifierGuard":
        head_file = Path(head_file)
        meta_file = head_file.with_suffix(".json")
        if not head_file.exists() or not meta_file.exists():
            raise FileNotFoundError(f"{head_file}: the guard head (and its .json) is missing; "
                                    "train it with `llamaforge train-guard`")
        meta = json.loads(meta_file.read_text())
        known = category_map(DEFAULT_CATEGORIES)
        cats = [known.get(c["code"], Category(c["code"], c["name"])) for c in meta["categories"]]
        codes = {c.code for c in cats}
        on = set(enabled) if enabled else None
        if on and not on <= codes:
            raise ValueError(f"the default guard knows categories {sorted(codes)}, not {sorted(on - codes)}")
        state = load_file(str(head_file))
        if "members" in meta:   # format 3: each member's tensors under "<name>."
            members = [(m, m["name"] + ".") for m in meta["members"]]
        else:                   # format 2: one fine-tuned MiniLM, unprefixed
            members = [({"name": "minilm", **meta["encoder"]}, "")]
        loaded = [_load_member(m, {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}, len(cats), meta_file)
                  for m, pre in members]
        return cls(loaded, cats, float(meta["threshold"] if threshold is None else threshold), on)

    @torch.inference_mode()
    def scores(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """P(unsafe) [N] and category probabilities [N, C]."""
        # torch's thread count is process-wide: the guard runs beside a model (chat, serve), so it
        # leaves that setting alone
        # a text scores as its most unsafe part (`normalise.scored_parts`): its paragraphs and its
        # de-obfuscated views
        owner, parts = [], []
        for i, t in enumerate(texts):
            segs = scored_parts(t, self.deobfuscate)
            owner += [i] * len(segs)
            parts += segs
        p_all, c_all = 0.0, 0.0
        for encoder, head in self.members:
            out = head(encoder.embed(parts))
            p_all, c_all = p_all + torch.sigmoid(out[:, 0]), c_all + torch.sigmoid(out[:, 1:])
        p_all, c_all = p_all / len(self.members), c_all / len(self.members)
        p = torch.full((len(texts),), -1.0)
        cat = torch.zeros(len(texts), c_all.shape[1])
        for j, i in enumerate(owner):
            if p_all[j] > p[i]:
                p[i], cat[i] = p_all[j], c_all[j]
        return p, cat

    def check_batch(self, texts: Sequence[str], role: Role = "User",
                    context: list[dict] | None = None) -> list[Verdict]:
        # the classifier judges the checked turn on its own; context only matters to Llama Guard
        _check_role(role)
        texts = [str(t) for t in texts]
        p, cat = self.scores(texts)
        out = []
        for i in range(len(texts)):
            order = cat[i].argsort(descending=True).tolist()
            codes = [self.categories[j].code for j in order if cat[i, j] >= 0.5] or [self.categories[order[0]].code]
            flagged = float(p[i]) >= self.threshold
            if flagged and self.enabled is not None:
                codes = [c for c in codes if c in self.enabled]
                flagged = bool(codes)
            out.append(Verdict(not flagged, self._labels(codes) if flagged else [], float(p[i]), role))
        return out


def _load_member(meta: dict, state: dict[str, torch.Tensor], n_categories: int, meta_file: Path):
    """(encoder, head) of one member of the default guard from its metadata and tensors."""
    # encoder.* tensors are fine-tuned encoder layers, loaded over the pip package's weights
    overrides = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    if "fc1.weight" not in state:
        raise ValueError(f"{meta_file}: the guard file has no head for member {meta.get('name')!r}")
    head = Head(state["fc1.weight"].shape[1], state["fc1.weight"].shape[0], n_categories)
    # heads written before feature standardisation existed have no shift/scale: identity
    head.load_state_dict({"shift": head.shift, "scale": head.scale, **state})
    if meta.get("name") == "smollm2":
        encoder = LMFeatures.load(int(meta["layer"]))
    elif meta.get("name") == "minilm":
        encoder = MiniLM.load(overrides=overrides)
    else:
        raise ValueError(f"{meta_file}: unknown guard member {meta.get('name')!r}")
    return encoder, head.eval()


class LlamaGuard(Guard):
    """A Llama Guard (v1) checkpoint run through llamaforge: prompt -> greedy answer -> parsed verdict."""

    def __init__(self, llm, categories: Sequence[Category] = LLAMA_GUARD_V1, threshold: float | None = None,
                 max_tokens: int = 20):
        super().__init__(categories)
        self.llm = llm
        self.threshold = threshold
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, path: str | Path, *, categories: Sequence[Category] | None = None,
             threshold: float | None = None) -> "LlamaGuard":
        return cls(Llama.load(path), categories or LLAMA_GUARD_V1, threshold)

    def prompt(self, text: str, role: Role = "User", context: list[dict] | None = None) -> str:
        """The Llama Guard prompt text for checking ``text`` as ``role``'s turn."""
        _check_role(role)
        return render_prompt(conversation_turns(text, role, context), role, self.categories)

    def prompt_ids(self, text: str, role: Role = "User", context: list[dict] | None = None) -> list[int]:
        """Token ids the model sees: BOS then the prompt (as Meta's tokenizer encodes it)."""
        return self.llm.tokenizer.encode(self.prompt(text, role, context), bos=True)

    def unsafe_probability(self, ids: Sequence[int]) -> float:
        """P(first answer token starts "unsafe"), the score Llama Guard's paper ranks by."""
        logits = self.llm.logits(ids)[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        first = self.llm.tokenizer.encode("unsafe", bos=False)
        return float(probs[first[0]]) if first else 0.0

    def verdict_from_output(self, output: str, score: float, role: Role = "User") -> Verdict:
        """Turn the model's answer into a Verdict; an unparsable answer is treated as unsafe (fail closed)."""
        parsed = parse_output(output)
        if parsed is None:
            log.warning("Llama Guard answered %r, which is neither 'safe' nor 'unsafe': treating as unsafe", output[:80])
            return Verdict(False, ["unparsable guard output"], score, role)
        safe, codes = parsed
        if self.threshold is not None:
            safe = score < self.threshold
        return Verdict(safe, [] if safe else self._labels(codes), score, role)

    def check_batch(self, texts: Sequence[str], role: Role = "User",
                    context: list[dict] | None = None) -> list[Verdict]:
        out = []
        for text in texts:
            ids = self.prompt_ids(str(text), role, context)
            score = self.unsafe_probability(ids)
            answer = self.llm.complete(ids, max_tokens=self.max_tokens, temperature=0.0).text
            out.append(self.verdict_from_output(answer, score, role))
        return out


# -- CLI ------------------------------------------------------------------------------------------

def guard(text: str | None = None, *, file: str | None = None, jsonl: bool = False, model: str | None = None,
          threshold: float | None = None, taxonomy: Taxonomy = "llama-guard-1") -> int:
    """Check text with the safety guard (exit code 1 when something is flagged).

    text: the text to check; omitted, read --file, or stdin when piped
    file: a file of prompts, one per line
    jsonl: print one JSON object per line: {"text", "safe", "categories", "score"}
    model: a Llama Guard checkpoint, or a guard head (.safetensors); the shipped classifier when omitted
    threshold: flag when the unsafe probability reaches this (default: the guard's own)
    taxonomy: name categories as Llama Guard v1 (O1-O7) or MLCommons (S1-S14) does
    """
    check_taxonomy(taxonomy)
    if text is not None and file is not None:
        raise ValueError("give a text or --file, not both")
    if file is not None:
        p = Path(file)
        if not p.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        texts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif text is not None:
        texts = [text]
    elif not sys.stdin.isatty():
        texts = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    else:
        raise ValueError("nothing to check: give a text, --file PROMPTS.txt, or pipe text on stdin")
    if not texts:
        raise ValueError("nothing to check: the input is empty")
    checker = Guard.load(model, threshold=threshold)
    if isinstance(checker, ClassifierGuard):
        # this process runs nothing else: one thread is fastest for the small encoder, and far
        # faster than two on a machine whose cores are busy
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    verdicts: list[Verdict] = []
    for s in range(0, len(texts), 64):
        verdicts.extend(checker.relabel(v, t, taxonomy) for v, t in zip(checker.check_batch(texts[s:s + 64]), texts[s:s + 64]))
    log.info("%d texts checked in %.1f ms each", len(texts), 1000 * (time.perf_counter() - t0) / len(texts))
    for t, v in zip(texts, verdicts):
        if jsonl:
            print(json.dumps({"text": t, **v.to_dict()}, ensure_ascii=False))
        else:
            status = "safe" if v.safe else "unsafe"
            cats = f" [{', '.join(v.categories)}]" if v.categories else ""
            print(f"{status}{cats} score={v.score:.3f}" + (f"  {t}" if len(texts) > 1 else ""))
    return 0 if all(v.safe for v in verdicts) else 1
