"""The bundled GGUF through llamaforge vs transformers' own GGUF loader: same greedy chat answer."""
import pytest
import torch

from llamaforge import Llama
from llamaforge.paths import default_model_path

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model():
    p = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             dtype=torch.float32).eval()


def test_same_32_greedy_tokens_on_a_chat_prompt(hf_model):
    llm = Llama.load()
    ids = llm.encode_chat([{"role": "user", "content": "Give me three tips for staying healthy."}])
    ours = llm.complete(ids, max_tokens=32, ignore_eos=True).tokens
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs
    with torch.no_grad():
        diff = (hf_model(torch.tensor([ids + ours])).logits[0].float() - llm.logits(ids + ours)).abs().max()
    assert float(diff) <= 1e-3
