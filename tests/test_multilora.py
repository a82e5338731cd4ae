"""Many LoRA adapters on one base (multilora.py): every row of a mixed-adapter batch decodes exactly
what `Llama.load(base, adapter=DIR)` decodes for it alone, on the bundled GGUF model."""
from __future__ import annotations

import functools

import pytest
import torch

from llamaforge.api import Llama
from llamaforge.generate import Batch, generate
from llamaforge.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from llamaforge.multilora import AdapterBank, MultiLoraLinear
from llamaforge.sampling import SamplingParams

# (rank, targets) per adapter: different ranks and module sets share one batch
SPECS = {"qv": (8, ("q", "v")), "attn": (4, ("q", "k", "v", "o")), "mlp": (8, ("gate", "up", "down")),
         "all": (16, ("q", "k", "v", "o", "gate", "up", "down"))}
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Three facts about owls:", "Once upon a time", "The best way to learn Python is",
           "List the planets of the solar system.", "A good breakfast has"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def make_adapters(base, root, specs=SPECS) -> dict:
    """Random PEFT adapters of the model at base, one folder each under root (B not zero, so each
    one changes the output)."""
    out = {}
    for seed, (name, (r, targets)) in enumerate(specs.items()):
        model = Llama.load(base).model
        apply_lora(model, LoraConfig(r=r, alpha=2 * r, targets=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.05)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        out[name] = save_adapter(model, root / name)
    return out


@pytest.fixture(scope="module")
def adapters(bundled_gguf, tmp_path_factory):
    return make_adapters(bundled_gguf, tmp_path_factory.mktemp("adapters"))


@functools.lru_cache(maxsize=None)
def _loaded(path, adapter) -> Llama:
    return Llama.load(path, adapter=adapter)


def _alone(path, adapter, prompt: str) -> list[int]:
    llm = _loaded(path, adapter)
    return [ev.id for ev in generate(llm.model, llm.tokenizer.encode(prompt), GREEDY, llm.tokenizer)]


def test_mixed_adapter_batch_matches_each_adapter_alone(bundled_gguf, adapters):
    names = [None, *SPECS, "qv", "mlp", "all"]          # 8 rows: the base and every adapter, some twice
    llm = Llama.load(bundled_gguf)
    bank = AdapterBank(llm.model)
    for name, path in adapters.items():
        bank.load(name, path)
    batch = Batch(llm.model, llm.tokenizer, max_batch=8, adapters=bank)
    seqs = [batch.add(llm.tokenizer.encode(p), GREEDY, adapter=n) for p, n in zip(PROMPTS, names)]
    while any(not s.finish_reason for s in seqs):
        batch.step()
    got = [s.out for s in seqs]
    want = [_alone(bundled_gguf, adapters[n] if n else None, p) for p, n in zip(PROMPTS, names)]
    assert got == want
    # the adapters matter: each changes the base model's answer to the same prompt
    base = _alone(bundled_gguf, None, PROMPTS[1])
    assert all(_alone(bundled_gguf, adapters[n], PROMPTS[1]) != base for n in ("qv", "mlp"))


def test_load_unload_and_errors(bundled_gguf, adapters, tmp_path):
    llm = Llama.load(bundled_gguf)
    bank = AdapterBank(llm.model)
    bank.load("qv", adapters["qv"])
    wq = llm.model.layers[0].attention.wq
    assert isinstance(wq, MultiLoraLinear) and list(wq.factors) == ["qv"]
    with pytest.raises(ValueError, match="already loaded"):
        bank.load("qv", adapters["qv"])
    with pytest.raises(ValueError, match="adapter name"):
        bank.load("../x y", adapters["qv"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bank.load("none", tmp_path)
    batch = Batch(llm.model, llm.tokenizer, max_batch=2, adapters=bank)
    with pytest.raises(ValueError, match="no LoRA adapter named 'mlp'"):
        batch.add([1, 2, 3], GREEDY, adapter="mlp")
    assert batch.slot_counts() == (2, 0, 2)            # the refused request took no slot
    bank.unload("qv")
    assert bank.names == [] and type(llm.model.layers[0].attention.wq) is type(wq.base)
    with pytest.raises(KeyError):
        bank.unload("qv")
    # rows of unknown adapters are refused before any forward
    with pytest.raises(KeyError, match="no adapter loaded as qv"):
        with bank.rows(["qv"]):
            pass


def test_prefix_reuse_never_crosses_adapters(bundled_gguf, adapters):
    """Cached keys of one adapter's sequence are not reused for the same prompt under another."""
    llm = Llama.load(bundled_gguf)
    bank = AdapterBank(llm.model)
    bank.load("all", adapters["all"])
    ids = llm.tokenizer.encode(PROMPTS[0])
    batch = Batch(llm.model, llm.tokenizer, max_batch=2, adapters=bank, prefix_reuse=True)
    a = batch.add(ids, GREEDY, adapter="all")
    b = batch.add(ids, GREEDY)                          # same prompt, base model: nothing reused
    assert b.reused == 0
    c_batch = Batch(llm.model, llm.tokenizer, max_batch=2, adapters=bank, prefix_reuse=True)
    c_batch.add(ids, GREEDY, adapter="all")
    c = c_batch.add(ids, GREEDY, adapter="all")         # same prompt, same adapter: reused whole
    assert c.reused == len(ids)
    while not (a.finish_reason and b.finish_reason):
        batch.step()
    assert a.out == _alone(bundled_gguf, adapters["all"], PROMPTS[0])
    assert b.out == _alone(bundled_gguf, None, PROMPTS[0])


def test_mixed_adapter_decode_steps_take_the_one_call_block_bit_for_bit(bundled_gguf, adapters):
    """A mixed-adapter decode step runs each block in one native call (block_rows with each row's
    adapter updates) and computes what the blocks' modules compute: the same tokens and logprobs."""
    llm = Llama.load(bundled_gguf)
    bank = AdapterBank(llm.model)
    for name, path in adapters.items():
        bank.load(name, path)
    fused = [vars(layer)["forward"] for layer in llm.model.layers]
    one_token_module_calls = []
    for f in fused:
        f.module_forward = (lambda fwd: lambda *a: (a[0].shape[1] == 1 and one_token_module_calls.append(1))
                            or fwd(*a))(f.module_forward)
    names = [None, "qv", "attn", "mlp", "all", "qv"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)

    def run(use_fused: bool):
        for layer, f in zip(llm.model.layers, fused):
            layer.forward = f if use_fused else f.module_forward
        batch = Batch(llm.model, llm.tokenizer, max_batch=6, adapters=bank)
        seqs = [batch.add(llm.tokenizer.encode(p), params, adapter=n) for p, n in zip(PROMPTS, names)]
        while any(not s.finish_reason for s in seqs):
            batch.step()
        return [(s.out, s.logprobs) for s in seqs]

    want = run(False)
    assert one_token_module_calls
    one_token_module_calls.clear()
    got = run(True)
    assert not one_token_module_calls     # every decode step took block_rows
    assert got == want
    assert any(isinstance(m, MultiLoraLinear) for m in llm.model.modules())
