"""LoRA: wrapping, PEFT-format save/load checked against peft + transformers, merge, QLoRA wrapping."""
from __future__ import annotations

import json

import pytest
import torch

from llamaforge.config import preset
from llamaforge.lora import (LoraConfig, LoraLinear, apply_lora, load_adapter, lora_modules, merge_lora,
                             read_adapter, save_adapter)
from llamaforge.model import Transformer


def _tiny(name: str = "tiny", seed: int = 0) -> Transformer:
    return Transformer(preset(name)).init_weights(seed).eval()


def _randomize_lora(model: Transformer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_wrapping_starts_at_base_and_trains_only_adapters():
    model = _tiny()
    x = torch.randint(0, 256, (2, 12))
    before = model(x)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
    assert torch.equal(model(x), before)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(lora_modules(model)) == 2 * 3
    assert isinstance(model.layers[0].feed_forward.w2, LoraLinear)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraConfig(targets=("qq",))


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_peft_loads_our_adapter_with_same_logits(tmp_path, name):
    """An adapter saved by llamaforge, loaded by peft.PeftModel on transformers' LlamaForCausalLM."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llamaforge.formats import hf

    model = _tiny(name)
    hf.write(tmp_path / "base", model.args, {k: v for k, v in model.state_dict().items()})
    apply_lora(model, LoraConfig(r=4, alpha=8))
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    x = torch.randint(0, model.args.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(x)
        theirs = ref(input_ids=x).logits
        base_only = Transformer(model.args).init_weights(0).eval()(x)
    assert (ours - base_only).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_load_adapter_round_trip_and_merge(tmp_path):
    model = _tiny()
    apply_lora(model, LoraConfig(r=2, alpha=4, targets=("q", "k", "up")))
    _randomize_lora(model, seed=3)
    save_adapter(model, tmp_path / "a")
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        expected = model(x)
        unmerged = load_adapter(_tiny(), tmp_path / "a", merge=False)
        assert torch.allclose(unmerged(x), expected, atol=1e-6)
        merged = load_adapter(_tiny(), tmp_path / "a")          # default: folded into the weights
        assert not lora_modules(merged)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(unmerged)(x), expected, atol=1e-5, rtol=0)
    config, tensors = read_adapter(tmp_path / "a")
    assert config.r == 2 and config.targets == ("q", "k", "up") and len(tensors) == 2 * 2 * 3


def test_peft_saved_adapter_loads_into_llamaforge(tmp_path):
    """The other direction: an adapter created and saved by peft gives peft's logits in llamaforge."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llamaforge.formats import hf

    model = _tiny()
    hf.write(tmp_path / "base", model.args, dict(model.state_dict()))
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj",
                                                                                       "gate_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "peft_adapter")
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        theirs = ref.eval()(input_ids=x).logits
        ours = load_adapter(_tiny(), tmp_path / "peft_adapter")(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_bad_adapter_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING", "r": 4}')
    with pytest.raises(ValueError, match="not supported"):
        load_adapter(_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_adapter(_tiny(), tmp_path)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_qlora_over_packed_linears_matches_lora_over_their_dequantized_weights(kind):
    """QLoRA: LoRA over the inference path's packed int8/int4 modules. Only the adapters train, and their
    gradients equal those of plain LoRA on a float model holding the dequantized weights."""
    quant = pytest.importorskip("llamaforge.quant")
    if not hasattr(quant, "quantize_model"):
        pytest.skip("llamaforge.quant.quantize_model is not available yet")
    from llamaforge.quant.linear import dequantized_weight
    args = preset("tiny").replace(dim=128, multiple_of=64)
    qmodel = Transformer(args).init_weights(0)
    quant.quantize_model(qmodel, kind)
    # the float twin: every weight replaced by what the packed module computes with
    fmodel = Transformer(args).init_weights(0)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if hasattr(m, "in_features") and not isinstance(m, torch.nn.Linear):
                fmodel.get_submodule(name).weight.copy_(dequantized_weight(m))
        fmodel.tok_embeddings.weight.copy_(qmodel.tok_embeddings(torch.arange(256)))
    grads = []
    x = torch.randint(0, 256, (2, 8))
    for model in (qmodel, fmodel):
        apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
        _randomize_lora(model)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and all(".lora_" in n for n in grads[0])
    for n, g in grads[1].items():   # the packed kernels compute in bf16: agreement to bf16 precision
        torch.testing.assert_close(grads[0][n], g, atol=2e-3, rtol=5e-2, msg=n)


def test_adapter_over_a_quantized_model_stays_unmerged(tmp_path):
    """Llama.load(..., quantize="auto", adapter=...) order: packed base first, then the adapter."""
    quant = pytest.importorskip("llamaforge.quant")
    if not hasattr(quant, "quantize_model"):
        pytest.skip("llamaforge.quant.quantize_model is not available yet")
    args = preset("tiny").replace(dim=128, multiple_of=64)
    model = apply_lora(Transformer(args).init_weights(0), LoraConfig(r=4, alpha=8))
    _randomize_lora(model)
    save_adapter(model, tmp_path)
    x = torch.randint(0, 256, (1, 12))
    packed = quant.quantize_model(Transformer(args).init_weights(0).eval(), "int8")
    load_adapter(packed, tmp_path)
    assert len(lora_modules(packed)) == 2 * 7
    with torch.no_grad():
        want = model.eval()(x)
        got = packed(x)
    assert (got - want).abs().max() < 0.05 * want.abs().max()   # int8 weights: close, not equal
