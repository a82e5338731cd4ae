"""`llamaforge <command>`: each command is one typed library function; its signature is its CLI.

Positional parameters become positional arguments, keyword-only ones become --options; bool
options become --flag/--no-flag, list options take several values. The first docstring line is
the command's help, and `name: text` lines in the docstring become the options' help.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
import types
import typing
from typing import Any, Callable

COMMANDS: dict[str, str] = {
    "generate": "llamaforge.commands:generate",
    "chat": "llamaforge.commands:chat",
    "info": "llamaforge.commands:info",
    "quantize": "llamaforge.quant.command:quantize",
    "convert": "llamaforge.commands:convert",
    "bench": "llamaforge.benchmark:bench",
    "serve": "llamaforge.server.app:serve",
    "pretrain": "llamaforge.train.commands:pretrain",
    "finetune": "llamaforge.train.commands:finetune",
    "pretokenize": "llamaforge.train.commands:pretokenize",
    "train-tokenizer": "llamaforge.train.commands:train_tokenizer",
    "merge": "llamaforge.train.commands:merge",
    "evaluate": "llamaforge.eval.harness:evaluate",
    "guard": "llamaforge.safety.guard:guard",
    "card": "llamaforge.cards:card",
}


def _resolve(spec: str) -> Callable[..., Any]:
    mod, name = spec.split(":")
    return getattr(importlib.import_module(mod), name)


def _param_help(doc: str) -> dict[str, str]:
    out = {}
    for line in doc.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier() and text.strip():
            out[name] = text.strip()
    return out


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return tp


def add_function_arguments(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> None:
    hints = typing.get_type_hints(fn)
    helps = _param_help(inspect.getdoc(fn) or "")
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp = _unwrap_optional(hints.get(name, str))
        origin = typing.get_origin(tp)
        kw: dict[str, Any] = {"help": helps.get(name, "")}
        if origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif origin in (list, tuple):
            kw["nargs"] = "*" if p.kind == p.POSITIONAL_OR_KEYWORD else "+"
            kw["type"] = (typing.get_args(tp) or (str,))[0]
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        if p.kind == p.POSITIONAL_OR_KEYWORD or p.kind == p.POSITIONAL_ONLY:
            if p.default is not p.empty and "nargs" not in kw:
                kw["nargs"] = "?"
            if p.default is not p.empty:
                kw["default"] = p.default
            kw.pop("action", None)
            parser.add_argument(name, **kw)
        else:
            kw["default"] = None if p.default is p.empty else p.default
            if kw["default"] is not None and kw["help"] is not None and "action" not in kw:
                kw["help"] = f"{kw['help']} (default: {kw['default']})".strip()
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=p.default is p.empty, **kw)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: shown as one line, not a traceback."""
    from .formats import CheckpointError
    from .generate import ContextOverflow
    errs: list[type[BaseException]] = [CheckpointError, ContextOverflow, FileNotFoundError, ValueError,
                                        KeyError, PermissionError, IsADirectoryError]
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamaforge", description="A complete, fully open Llama 2 stack.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # import only the module of the command being run, so `llamaforge chat` does not load the server
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, spec in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name, add_help=False)
            continue
        try:
            fn = _resolve(spec)
        except (ImportError, AttributeError) as e:
            sub.add_parser(name, help=f"(unavailable: {e})")
            continue
        doc = inspect.getdoc(fn) or ""
        sp = sub.add_parser(name, help=doc.split("\n")[0], description=doc.split("\n\n")[0])
        add_function_arguments(sp, fn)
        sp.set_defaults(_fn=fn)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(ns, "_fn", None):
        if ns.command:
            parser.error(f"command {ns.command!r} is not available in this installation")
        parser.print_help()
        return 2
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("command", "_fn", "verbose")}
    try:
        result = ns._fn(**kwargs)
    except KeyboardInterrupt:
        return 130
    except user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llamaforge {ns.command}: error: {msg}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
