"""The Python entry point: `Llama.load(path)` then `complete`, `chat`, `logits`, `embed`."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from . import ops
from .cache import kv_dtype, row_width
from .chat import encode_chat
from .config import ModelArgs, torch_dtype
from .embedding import check_inputs, embed_ids
from .formats import Checkpoint, load_checkpoint
from .generate import ContextOverflow, generate, generate_batch
from .lora import load_adapter
from .memory import release_code_pages
from .model import Transformer
from .paths import default_model_path
from .quant import KINDS, quantize_model
from .quant.repack import load_packed
from .safety.license import notice_once
from .sampling import SamplingParams
from .speculative import DraftModel, PromptLookup, as_lookup

log = logging.getLogger(__name__)

Weights = Literal["blocks", "float"]
WEIGHTS = ("blocks", "float")
_UNSET: Any = object()   # tells quantize=None given (old meaning: float weights) from not given


def load_options(weights: str | None, quantize: str | None | object = _UNSET) -> tuple[str, str | None]:
    """(weights, quantize) as Llama.load uses them, from the current spelling or the deprecated one.

    Current: weights "blocks" | "float" (default "blocks"), quantize None | "none" | "int8" | "int4".
    Deprecated, with a DeprecationWarning: quantize="auto" (weights="blocks") and quantize=None with
    no weights given (weights="float"), the meanings quantize had before weights existed.
    """
    if quantize == "auto" or (quantize is None and weights is None):
        old = "weights='blocks'" if quantize == "auto" else "weights='float'"
        warnings.warn(f"quantize={quantize!r} is deprecated: use {old} (quantize now only means int8/int4 "
                      "repacking)", DeprecationWarning, stacklevel=3)
        weights = weights or ("blocks" if quantize == "auto" else "float")
        quantize = None
    if quantize is _UNSET or quantize == "none":
        quantize = None
    if quantize is not None and quantize not in KINDS:
        raise ValueError(f"quantize must be None, {' or '.join(KINDS)} (got {quantize!r})")
    if quantize is not None:
        if weights == "blocks":
            raise ValueError("quantize repacks float weights: use weights='float' or leave weights unset")
        weights = "float"
    weights = weights or "blocks"
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} (got {weights!r})")
    return weights, quantize


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class Llama:
    """A loaded model with its tokenizer and chat template."""

    def __init__(self, model: Transformer, tokenizer, chat_template: str | None = None,
                 checkpoint: Checkpoint | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.checkpoint = checkpoint

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @classmethod
    def load(cls, path: str | Path | None = None, *, adapter: str | Path | None = None, dtype: str = "float32",
             weights: Weights | None = None, quantize: str | None | object = _UNSET, max_seq_len: int | None = None,
             device: str = "cpu", progress: bool = False, kv_type: str | None = None) -> "Llama":
        """Load a Meta folder, HF folder or GGUF file (the bundled SmolLM2 when path is None).

        weights: "blocks" (default) computes with a GGUF's quantized blocks as they are (llamaforge's
            native kernels, float32 arithmetic; float checkpoints stay float); "float" dequantizes
            them to `dtype` matrices.
        quantize: None (default), or "int8"/"int4" to repack the float weights into PyTorch's packed
            weight-only kernels. The old spellings quantize="auto" (= weights="blocks") and
            quantize=None without weights (= weights="float") still work, with a DeprecationWarning.
        adapter: a PEFT-format LoRA folder applied on top.
        kv_type: KV cache element type, "f32", "f16" (half the cache memory) or "q8_0" (GGML Q8_0
            blocks, 34 bytes per 32 values; the head size must be a multiple of 32); None: float16 for
            the generation caches of GGUF models computed from their blocks (llama.cpp's default),
            with evaluation scoring in the model's dtype, else the model's dtype everywhere.
        """
        weights, quantize = load_options(weights, quantize)
        path = Path(path) if path is not None else default_model_path()
        kv = kv_dtype(kv_type)   # a bad name fails before the weights are read
        packed = weights == "blocks" and quantize is None   # GGUF blocks stay packed (memory-mapped)
        target = torch_dtype(dtype)
        ops.refresh()   # LLAMAFORGE_NATIVE is read per load, not per operation
        ckpt = load_checkpoint(path, progress=progress, dequantize=not packed)
        notice_once(ckpt)  # the Llama 2 licence notice and the Acceptable Use Policy, once per machine
        if ckpt.args is None:
            raise ValueError(f"{path}: holds a vocabulary only, no model weights")
        args = ckpt.args if max_seq_len is None else ckpt.args.replace(max_seq_len=max_seq_len)
        if kv is not None:
            row_width(kv, args.head_dim)   # q8_0 needs whole blocks per head: refuse here, not at the first cache
        if packed and (ckpt.format == "gguf" or any(not isinstance(t, torch.Tensor) for t in ckpt.tensors.values())):
            model = load_packed(args, ckpt.tensors, device, target, progress=progress)
        else:
            tensors = {k: t.to(target) for k, t in ckpt.tensors.items()}
            model = Transformer.empty(args, device=device).load_tensors(tensors).to(device).eval()
        ckpt.tensors = {}  # the model owns the weights now
        if kv is not None:   # else the loader's default (load_packed: float16 for big models)
            model.kv_dtype = kv   # every cache the model makes (generation, server, evaluation)
        if adapter is not None:
            load_adapter(model, adapter)
        if quantize is not None:
            quantize_model(model, quantize)
        tok = ckpt.tokenizer
        if tok is None:
            raise ValueError(f"{path}: no tokenizer found next to the weights")
        template = ckpt.chat_template or getattr(tok, "chat_template", None)
        release_code_pages()   # torch's start-up code, resident since import and not needed again
        return cls(model, tok, template, ckpt)

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [len(ids), vocab] of a full causal pass."""
        if len(ids) > self.args.max_seq_len:
            raise ContextOverflow(f"{len(ids)} tokens exceed the context window of {self.args.max_seq_len}")
        x = torch.tensor([list(ids)], device=self.model.rope_cos.device)
        return self.model(x)[0].float()

    def embed(self, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], *,
              budget: int = 2048, activations: str | None = None) -> torch.Tensor:
        """Float32 [n, D] embeddings: per input, the mean over its tokens of the final normed hidden
        states, L2-normalised (llamaforge.embedding). A text is tokenized as a prompt is (a BOS
        only if the tokenizer adds one); a list of ints is one input of token ids. Inputs run
        together, at most `budget` padded tokens per forward. activations="int8": a GGUF model's
        matmuls with 8-bit activations, as llama.cpp (faster; cosine >= 0.999 to the default). That
        setting is process-wide for the duration of the call (quant.ggml.using_activations), so do
        not use it while another thread computes with a GGUF model; the server never does."""
        seqs = self.embedding_ids(inputs)
        check_inputs(seqs, self.args.max_seq_len, self.args.vocab_size)
        return embed_ids(self.model, seqs, budget, activations)

    def embedding_ids(self, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids of each input of `embed` (a string, strings, a list of ids, or lists of ids)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]      # type: ignore[list-item]
        return [self.encode_prompt(x) for x in inputs]

    # -- generation ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], bos: bool | None = None) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos if bos is None else bos)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt ids of a conversation in the model's chat format."""
        return encode_chat(self.tokenizer, messages, self.chat_template)

    def complete(self, prompt: str | Sequence[int], *, stream: bool = False, echo: bool = False,
                 lookup: int | PromptLookup | DraftModel | None = None, **sampling: Any) -> Completion | Iterator[str]:
        """Continue a prompt. Sampling options are SamplingParams fields (max_tokens, temperature, ...).

        lookup: speculative decoding by prompt lookup, k draft tokens per forward (or a PromptLookup,
        whose stats count drafts), or by a smaller model with the same vocabulary
        (`small.drafter(k)`); the output is the same, faster when the drafts are right.
        """
        ids = self.encode_prompt(prompt)
        params = SamplingParams(**sampling)
        prefix = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)) if echo else ""
        return self._run(ids, params, stream, prefix, lookup)

    def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool = False,
             lookup: int | PromptLookup | DraftModel | None = None, **sampling: Any) -> Completion | Iterator[str]:
        """Answer the last user message with the model's chat format (Llama 2 [INST], or its Jinja
        template); lookup as in `complete`."""
        return self._run(self.encode_chat(messages), SamplingParams(**sampling), stream, "", lookup)

    def drafter(self, k: int = 4) -> DraftModel:
        """This model as the draft of a bigger one with the same vocabulary: `big.complete(prompt,
        lookup=small.drafter(4))` proposes 4 tokens per verify forward of the big model."""
        return DraftModel(self.model, k)

    def complete_batch(self, prompts: Sequence[str | Sequence[int]], **sampling: Any) -> list[Completion]:
        """Several prompts decoded together in one batch."""
        ids = [self.encode_prompt(p) for p in prompts]
        params = SamplingParams(**sampling)
        seqs = generate_batch(self.model, ids, params, self.tokenizer)
        return [Completion(s.stream.text if s.stream else "", list(s.out), s.finish_reason or "length", len(s.prompt),
                           s.logprobs if params.logprobs else None) for s in seqs]

    def _run(self, ids: list[int], params: SamplingParams, stream: bool, prefix: str,
             lookup: int | PromptLookup | DraftModel | None = None):
        lookup = as_lookup(lookup)   # a bad value fails here, not at the first streamed piece
        if len(ids) >= self.args.max_seq_len:
            raise ContextOverflow(f"the prompt has {len(ids)} tokens but the context window is {self.args.max_seq_len}")
        events = generate(self.model, ids, params, self.tokenizer, lookup=lookup)
        if stream:
            return self._stream(events, prefix)
        out, lps, pieces, reason = [], [], [prefix], "length"
        for ev in events:
            pieces.append(ev.text)
            if ev.finish_reason != "stop" or ev.id not in self.tokenizer.eog_ids:
                out.append(ev.id)
                if ev.logprob is not None:
                    lps.append(ev.logprob)
            reason = ev.finish_reason or reason
        return Completion("".join(pieces), out, reason, len(ids), lps if params.logprobs else None)

    @staticmethod
    def _stream(events, prefix: str) -> Iterator[str]:
        if prefix:
            yield prefix
        for ev in events:
            if ev.text:
                yield ev.text
