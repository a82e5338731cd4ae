"""Process memory: the start-up code of torch is given back after a model loads."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

CODE_KIB = r'''
import json, torch

def code_kib():
    total, cur = 0, ""
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and not f[0].endswith(":"):
            cur = f[1] + " " + (f[5] if len(f) > 5 else "")
        elif f[0] == "Rss:" and cur.startswith("r-xp") and "libtorch_cpu" in cur:
            total += int(f[1])
    return total
'''

PROBE = CODE_KIB + r'''
from llamaforge.memory import release_code_pages
a = torch.arange(6.0).reshape(2, 3)
before = code_kib()
released = release_code_pages()
after = code_kib()
out = (a @ a.T + 1).tolist()   # torch still runs: its code pages come back from the page cache
print(json.dumps({"before": before, "released": released, "after": after, "out": out,
                  "again": code_kib()}))
'''


def test_release_code_pages_drops_torch_start_up_code_and_torch_still_runs():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["before"] > 20 * 1024                  # import torch leaves tens of MiB of its code resident
    assert m["released"] >= m["before"]             # all of it, plus other libraries' code
    assert m["after"] < m["before"] / 4
    assert m["out"] == [[6.0, 15.0], [15.0, 51.0]]
    assert m["after"] < m["again"] < m["before"]    # a matmul faults back only the pages it runs


def test_loading_a_model_releases_start_up_code(bundled_gguf):
    probe = (CODE_KIB + "from llamaforge.api import Llama\n"
             + f"before = code_kib()\nllm = Llama.load({str(bundled_gguf)!r})\n"
             "print(json.dumps({'before': before, 'after': code_kib(), 'text': llm.complete('The capital of France is', max_tokens=4).text}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["after"] < m["before"] / 2 and "Paris" in m["text"], m
