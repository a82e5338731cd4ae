"""The core commands: generate, chat, info, convert. Thin: parse nothing, call the library, print."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from .api import Llama, Weights
from .conversion import convert_checkpoint
from .describe import describe
from .paths import default_model_path
from .safety.guard import Guard
from .speculative import as_lookup

Quantize = Literal["none", "int8", "int4", "auto"]   # "auto": deprecated spelling of --weights blocks
KVType = Literal["f32", "f16", "q8_0"]


def load_model(model: str | None, weights: str | None, quantize: str, **kwargs) -> Llama:
    """Llama.load with the CLI's --weights/--quantize (a note on stderr for the deprecated --quantize auto)."""
    if quantize == "auto":
        print("note: --quantize auto is deprecated; it means --weights blocks (the default)", file=sys.stderr)
        weights, quantize = weights or "blocks", "none"
    return Llama.load(model, weights=weights, quantize=quantize, **kwargs)


def _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop):
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()))


def _drafts(lookup: int, draft_model: str | None, weights, quantize, kv_type):
    """What --lookup / --draft-model ask for: a prompt-lookup k, or a draft model drafting k (default 4)."""
    if draft_model is None:
        return lookup
    return load_model(draft_model, weights, quantize, kv_type=kv_type).drafter(lookup or 4)


def generate(prompt: str, *, model: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, echo: bool = False,
             weights: Weights | None = None, quantize: Quantize = "none", kv_type: KVType | None = None,
             lookup: int = 0, draft_model: str | None = None) -> int:
    """Continue a prompt (raw completion, no chat template), streaming to stdout.

    model: checkpoint path (Meta folder, HF folder or .gguf); the bundled SmolLM2 when omitted
    temperature: 0 is greedy
    stop: strings that end generation
    weights: blocks (default) computes with a GGUF's quantized blocks (native kernels); float dequantizes them to float32
    quantize: int8/int4 repack the float weights for PyTorch's weight-only kernels (auto: deprecated, = --weights blocks)
    kv_type: KV cache element type (f16 halves its memory, q8_0 keeps 34/128 of it); default: f16 for GGUF models computed from their blocks (as llama.cpp), else the model's dtype
    lookup: speculative decoding by prompt lookup, up to K draft tokens per forward (e.g. 8; 0: off); same output, faster when it repeats the prompt
    draft_model: speculative decoding with this smaller model (same tokenizer) drafting K tokens per forward (--lookup K, default 4); same output
    """
    as_lookup(lookup)   # a bad K fails before the model loads
    llm = load_model(model, weights, quantize, kv_type=kv_type)
    drafts = _drafts(lookup, draft_model, weights, quantize, kv_type)
    for piece in llm.complete(prompt, stream=True, echo=echo, lookup=drafts,
                              **_sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat(prompt: str | None = None, *, model: str | None = None, system: str | None = None, max_tokens: int = 512,
         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
         repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
         weights: Weights | None = None, quantize: Quantize = "none", guard: bool = False, kv_type: KVType | None = None,
         lookup: int = 0, draft_model: str | None = None) -> int:
    """Chat with a model: interactive with a terminal, one answer for a prompt argument or piped stdin.

    prompt: one user message; omitted, read turns from the terminal (or all of stdin when piped)
    system: system prompt
    guard: moderate user input and model output with the default guard
    weights: blocks (default) computes with a GGUF's quantized blocks (native kernels); float dequantizes them to float32
    quantize: int8/int4 repack the float weights for PyTorch's weight-only kernels (auto: deprecated, = --weights blocks)
    kv_type: KV cache element type (f16 halves its memory, q8_0 keeps 34/128 of it); default: f16 for GGUF models computed from their blocks (as llama.cpp), else the model's dtype
    lookup: speculative decoding by prompt lookup, up to K draft tokens per forward (e.g. 8; 0: off); same answers, faster when they repeat the conversation
    draft_model: speculative decoding with this smaller model (same tokenizer) drafting K tokens per forward (--lookup K, default 4); same answers
    """
    as_lookup(lookup)   # a bad K fails before the model loads
    llm = load_model(model, weights, quantize, kv_type=kv_type)
    drafts = _drafts(lookup, draft_model, weights, quantize, kv_type)
    checker = None
    if guard:
        checker = Guard.load()
    opts = _sampling(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ValueError("no prompt given on stdin")

    def answer(user: str) -> None:
        if checker is not None:
            verdict = checker.check(user)
            if not verdict.safe:
                print(checker.refusal(verdict))
                return
        messages.append({"role": "user", "content": user})
        pieces = []
        if checker is None:
            for piece in llm.chat(messages, stream=True, lookup=drafts, **opts):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:  # moderated output is shown only once it is checked
            text = llm.chat(messages, lookup=drafts, **opts).text
            verdict = checker.check(text, role="Agent", context=messages)
            text = text if verdict.safe else checker.refusal(verdict)
            pieces.append(text)
            print(text)
        messages.append({"role": "assistant", "content": "".join(pieces)})

    if not interactive:
        answer(prompt)
        return 0
    print("llamaforge chat — empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        if user == "/reset":
            del messages[1 if system else 0:]
            continue
        answer(user)
    return 0


def info(path: str | None = None, *, json_output: bool = False) -> int:
    """Describe a checkpoint: architecture, parameters, tensor types, context, tokenizer, chat template, licence.

    path: checkpoint (Meta folder, HF folder or .gguf); the bundled model when omitted
    json_output: print JSON instead of text
    """
    d = describe(Path(path) if path else default_model_path())
    if json_output:
        print(json.dumps(d, indent=2, default=str))
    else:
        width = max(map(len, d))
        for k, v in d.items():
            if k == "chat_template" and v:
                print(f"{k:<{width}} :\n{v}")
            else:
                print(f"{k:<{width}} : {v}")
    return 0


def convert(src: str, *, output: str, to: str = "hf", dtype: str = "float32") -> int:
    """Convert a checkpoint between formats (Meta, HF safetensors, GGUF f32/f16).

    to: hf, meta or gguf
    output: destination folder (hf, meta) or .gguf file
    """
    convert_checkpoint(src, output, to=to, dtype=dtype)
    print(output)
    return 0
