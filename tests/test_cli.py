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


def test_dataclass_options_expand_into_flags_over_a_yaml_file(tmp_path):
    """A command's options dataclass becomes --field and --train.field flags; --config YAML sets the
    same fields, flags given on the command line win, unset fields keep the dataclass's defaults."""
    import argparse

    from llamaforge.cli import add_function_arguments, call_arguments
    from llamaforge.train.commands import finetune
    from llamaforge.train.configs import FinetuneConfig
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("data: sft.jsonl\nseq_len: 64\nlr: 0.01\ntrain:\n  max_steps: 9\n")
    parser = argparse.ArgumentParser()
    expanded = add_function_arguments(parser, finetune)
    ns = parser.parse_args(["--config", str(cfg), "--train.lr", "3e-4", "--train.max_steps", "5",
                            "--no-train.progress", "--lora-targets", "q", "v", "--method", "qlora"])
    opts = call_arguments(ns, expanded)["options"]
    assert isinstance(opts, FinetuneConfig)
    assert opts.data == str(tmp_path / "sft.jsonl") and opts.seq_len == 64 and opts.method == "qlora"
    assert opts.train.lr == 3e-4 and opts.train.max_steps == 5 and opts.train.progress is False
    assert opts.lora_targets == ["q", "v"] and opts.train.grad_accum == FinetuneConfig().train.grad_accum
    with pytest.raises(SystemExit):
        parser.parse_args(["--train.output", "x"])   # set from --output, not a flag of its own


def test_data_dir_follows_the_variable_and_fails_clearly_when_it_is_wrong(tmp_path, monkeypatch):
    from llamaforge import paths
    monkeypatch.setenv("LLAMAFORGE_DATA", str(tmp_path))
    assert paths.data_dir() == tmp_path
    monkeypatch.setenv("LLAMAFORGE_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="LLAMAFORGE_DATA"):
        paths.data_dir()


def test_chat_with_speculative_decoding_gives_the_same_answer():
    """chat --lookup K (prompt lookup) and --draft-model (here the bundled model drafting for itself)
    answer exactly as plain chat does; a bad K is a clear error before the model loads."""
    from llamaforge.paths import default_model_path
    ask = ("chat", "Repeat exactly: the quick brown fox jumps over the lazy dog near the river bank.", "--max-tokens", "24")
    plain = run(*ask)
    assert plain.returncode == 0 and "fox" in plain.stdout, plain.stderr
    for extra in (("--lookup", "8"), ("--draft-model", str(default_model_path()), "--lookup", "3")):
        r = run(*ask, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout == plain.stdout, extra
    bad = run(*ask, "--lookup", "-2")
    assert bad.returncode != 0 and "lookup" in bad.stderr and "Traceback" not in bad.stderr
