"""Native peers (llama.cpp through llama_cpp) run in child processes.

A segfault or abort inside a peer would otherwise end the whole pytest run and hide every later
result; here it fails only the test that called it, naming the signal and the peer's last output.

On machines whose CPU reports AMX the peer loads models without llama.cpp's AMX buffer
(``llamaforge.llama_cpp_peer``: VMs that report AMX without enabling it fault there) and the test
output says so; LLAMAFORGE_PEER_AMX=1 keeps AMX.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from llamaforge.llama_cpp_peer import amx_off, disable_extra_bufts

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python (test-only peer) is not installed")


def _child(conn, fn: Callable, args: tuple, kwargs: dict, log: str, no_amx: bool) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        if no_amx:
            disable_extra_bufts()
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


def run(fn: Callable[..., Any], *args: Any, timeout: float = 600, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a fresh child process; its return value (pickled) comes back.

    fn must be importable by name (a module-level function). A child killed by a signal, an
    exception in the child, or a time-out fails the calling test with the reason.
    """
    no_amx = amx_off()
    if no_amx:
        warnings.warn("llama.cpp peer runs with use_extra_bufts=false: AMX path off (the CPU reports AMX, "
                      "or LLAMAFORGE_PEER_AMX=0)", stacklevel=2)
    ctx = multiprocessing.get_context("spawn")   # no fork of a process that holds torch's threads
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="peer-", suffix=".log", delete=False) as f:
        log = f.name
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs, log, no_amx), daemon=True)
    proc.start()
    send.close()
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        msg = None
        if recv.poll(timeout):
            try:
                msg = recv.recv()
            except EOFError:
                pass
        else:
            proc.kill()
            proc.join(10)
            pytest.fail(f"peer {name} timed out after {timeout:.0f} s{_tail(log)}")
        proc.join(30)
        if msg is None:
            code = proc.exitcode
            if code is not None and code < 0:
                sig = signal.Signals(-code)
                pytest.fail(f"peer {name} crashed: killed by {sig.name} ({signal.strsignal(sig)})"
                            f"{' [AMX path was off]' if no_amx else ''}{_tail(log)}")
            pytest.fail(f"peer {name} exited with code {code} without a result{_tail(log)}")
        if msg[0] == "error":
            pytest.fail(f"peer {name} raised {msg[1]}\n{msg[2]}{_tail(log)}")
        return msg[1]
    finally:
        recv.close()
        Path(log).unlink(missing_ok=True)


def _tail(log: str, n: int = 15) -> str:
    try:
        lines = Path(log).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return ("\n--- peer output (last lines) ---\n" + "\n".join(lines)) if lines else ""


# ---------------------------------------------------------------- peer functions (run in the child)

def llama_cpp_greedy(path: str, ids: list[int], n: int, n_ctx: int = 64) -> list[int]:
    """n greedy tokens after ``ids`` by llama.cpp, one eval per token."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
    out = []
    llm.eval(ids)
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    llm.close()
    return out


def llama_cpp_logits(path: str, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (float32 [len(ids), vocab]), one batch."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def llama_cpp_quantize(src: str, dst: str, ftype: str, threads: int = 1) -> None:
    """llama.cpp's own quantizer (llama-quantize SRC DST FTYPE), e.g. ftype "Q4_K_M"."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed")


def llama_cpp_vocab(path: str, texts: list[str], *, add_bos: bool, special: bool) -> dict[str, Any]:
    """llama.cpp's tokenization of each text, the detokenization of those ids, and its BOS/EOS ids."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=special) for t in texts]
    out = {"ids": ids, "text": [llm.detokenize(i).decode("utf-8", errors="replace") for i in ids],
           "bos": llm.token_bos(), "eos": llm.token_eos()}
    llm.close()
    return out


def llama_cpp_extra_bufts() -> bool:
    """Whether llama_cpp.Llama would load with extra buffer types (AMX, repacking) in this child."""
    import llama_cpp.llama_cpp as lib
    return bool(lib.llama_model_default_params().use_extra_bufts)


def crash(sig: int) -> None:
    """Kill this process with a signal (the mechanism's own test)."""
    os.kill(os.getpid(), sig)
