"""Random-weight GGUFs with the shapes of Llama-2-7B and TinyLlama-1.1B, quantized by llama.cpp.

    python bench/make_llama_shaped.py /work/models --shape 1.1b 7b

Weights are N(0, 0.02), norms 1, written as F16 with Llama 2's SentencePiece vocabulary (llama.cpp's
``models/ggml-vocab-llama-spm.gguf``, taken from llama-cpp-python's source distribution), tensor by
tensor so a 13.5 GB 7B file never sits in memory. Each F16 file is then quantized by
``llama_cpp.llama_model_quantize`` (llama.cpp's own type mixes) and deleted unless --keep-f16.
Files: ``llama2-7b-shaped.Q4_K_M.gguf``, ``tinyllama-1.1b-shaped.Q6_K.gguf``, ... plus README.txt.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llamaforge.config import PRESETS, ModelArgs  # noqa: E402
from llamaforge.formats.gguf import read, write  # noqa: E402
from llamaforge.formats.common import expected_shapes  # noqa: E402

SHAPES = {
    "7b": ("llama2-7b-shaped", PRESETS["llama2-7b"], ("Q4_0", "Q4_K_M")),
    "1.1b": ("tinyllama-1.1b-shaped",
             ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                       max_seq_len=2048),
             ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")),
}
VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
STD = 0.02


class RandomWeight:
    """A weight drawn only when the writer asks for it (``dequantize()``, as for packed tensors)."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.shape, self.seed = shape, seed

    def dequantize(self) -> torch.Tensor:
        if len(self.shape) == 1:
            return torch.ones(self.shape)
        rng = np.random.default_rng(self.seed)
        w = rng.standard_normal(self.shape, dtype=np.float32)
        w *= STD
        return torch.from_numpy(w)


def find_vocab(cache: Path) -> Path:
    """ggml-vocab-llama-spm.gguf from an unpacked or downloaded llama-cpp-python sdist (downloaded once)."""
    out = cache / "ggml-vocab-llama-spm.gguf"
    if out.is_file():
        return out
    for hit in sorted(Path("/tmp").glob("lcpp*/llama_cpp_python-*/" + VOCAB_MEMBER)):
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        print("downloading llama-cpp-python's source distribution for Llama 2's vocabulary", flush=True)
        version = _llama_cpp_version()
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        spec, "-d", str(cache)], check=True)
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdists[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(VOCAB_MEMBER))
        src = tar.extractfile(member)
        assert src is not None
        out.write_bytes(src.read())
    return out


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def write_f16(path: Path, args: ModelArgs, vocab: Path, seed: int) -> None:
    tok = read(vocab).tokenizer
    shapes = expected_shapes(args)
    tensors = {name: RandomWeight(shape, seed * 100_003 + i) for i, (name, shape) in enumerate(shapes.items())}
    write(path, args, tensors, tokenizer=tok, qtype="f16", progress=True,
          metadata={"name": path.stem, "general.description": f"random N(0, {STD}) weights, unit norms"})


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (same as llama-quantize SRC DST FTYPE)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src.name} -> {ftype}) failed with {rc}")


def readme(folder: Path) -> None:
    lines = ["Random-weight Llama-shaped GGUF files for speed benchmarks (not language models).",
             "Written by bench/make_llama_shaped.py (llamaforge): weights N(0, 0.02), unit norms, Llama 2's",
             "SentencePiece vocabulary; quantized from F16 by llama.cpp's llama_model_quantize.",
             "Run one with: python bench/bench_inference.py --model FILE", ""]
    for f in sorted(folder.glob("*.gguf")):
        f.chmod(0o644)   # written via a private temporary file; other users run the benchmark
        lines.append(f"{f.name:45s} {f.stat().st_size / 2**30:6.2f} GiB")
    (folder / "README.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["1.1b", "7b"])
    ap.add_argument("--types", nargs="+", help="override the llama.cpp file types (e.g. Q4_K_M Q8_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-f16", action="store_true")
    ap.add_argument("--vocab", type=Path, help="ggml-vocab-llama-spm.gguf (default: found or downloaded)")
    a = ap.parse_args(argv)
    a.folder.mkdir(parents=True, exist_ok=True)
    vocab = a.vocab or find_vocab(Path.home() / ".cache" / "llamaforge")
    for shape in a.shape:
        stem, args, types = SHAPES[shape]
        f16 = a.folder / f"{stem}.F16.gguf"
        todo = [t for t in (a.types or types) if not (a.folder / f"{stem}.{t}.gguf").exists()]
        if todo and not f16.exists():
            t0 = time.time()
            write_f16(f16, args, vocab, a.seed)
            print(f"wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s", flush=True)
        for t in todo:
            t0 = time.time()
            out = a.folder / f"{stem}.{t}.gguf"
            quantize(f16, out, t, a.threads)
            print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s", flush=True)
            readme(a.folder)
        if f16.exists() and not a.keep_f16:
            f16.unlink()
        readme(a.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
