"""The `llamaforge` console script, run as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("llamaforge")


def run(*args, stdin=None, timeout=300):
    env = dict(os.environ, LLAMAFORGE_HOME=os.environ.get("LLAMAFORGE_HOME", "/tmp/llamaforge-test-home"))
    return subprocess.run([str(EXE), *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "info", "serve", "finetune", "evaluate", "quantize", "guard"):
        assert cmd in r.stdout


def test_chat_one_shot_from_argument_and_from_stdin():
    r = run("chat", "What is the capital of France?", "--max-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = run("chat", "--max-tokens", "20", stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_greedy_is_deterministic():
    a = run("generate", "The capital of France is", "--max-tokens", "6")
    b = run("generate", "The capital of France is", "--max-tokens", "6")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_info_describes_the_bundled_model():
    r = run("info")
    assert r.returncode == 0, r.stderr
    for s in ("llama", "30", "Q4_1", "8192", "bpe", "<|im_start|>", "apache-2.0"):
        assert s in r.stdout, s


@pytest.mark.parametrize("args, fragment", [
    (("generate", "hi", "--model", "/nonexistent/model"), "/nonexistent/model"),
    (("chat", "hi", "--temperature", "-1"), "temperature"),
])
def test_bad_input_is_one_clear_line(args, fragment):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and fragment in r.stderr
