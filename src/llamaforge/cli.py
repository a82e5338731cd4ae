"""`llamaforge <command>`: each command is one typed library function; its signature is its CLI.

Positional parameters become positional arguments, keyword-only ones become --options; bool
options become --flag/--no-flag, list options take several values. The first docstring line is
the command's help, and `name: text` lines in the docstring become the options' help.

A parameter typed as a dataclass (one per command: `train.options.PretrainConfig`, ...) expands
into its fields: `--seq-len 128`, and a nested dataclass's fields litgpt-style, `--train.lr 3e-4`
(`--train.max_steps` and `--train.max-steps` both work). Such a command also takes `--config
FILE.yaml`, whose keys are the same fields; flags given on the command line override the file, the
file overrides the dataclass's defaults (`options.build`). Field help comes from `name: text`
lines of the dataclass's docstring.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import sys
import types
import typing
from typing import Any, Callable

from . import options
from .formats import CheckpointError
from .generate import ContextOverflow

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
    "train-guard": "llamaforge.safety.training.command:train_guard",
    "align": "llamaforge.train.align:align",
    "score": "llamaforge.train.reward:score",
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


def _type_kwargs(tp: Any) -> dict[str, Any]:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = list(typing.get_args(tp))
        return {"choices": choices, "type": type(choices[0])}
    if origin in (list, tuple):
        return {"nargs": "+", "type": (typing.get_args(tp) or (str,))[0]}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": tp if tp in (int, float, str) else str}


def add_dataclass_arguments(parser: argparse.ArgumentParser, param: str, cls: type) -> None:
    """One option per leaf field of dataclass ``cls`` (dest "param:dotted.name"; absent unless given)."""
    helps: dict[type, dict[str, str]] = {}
    defaults = cls()
    for name, f, tp in options.walk(cls):
        owner = defaults
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        if type(owner) not in helps:
            helps[type(owner)] = _param_help(inspect.getdoc(type(owner)) or "")
        default = getattr(owner, f.name)
        text = helps[type(owner)].get(f.name, "")
        if default is not None and not isinstance(default, bool):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text = f"{text} (default: {shown})".strip()
        kw = _type_kwargs(tp)
        flags = ["--" + name.replace("_", "-")]
        if "_" in name and "action" not in kw:   # litgpt's spelling too: --train.max_steps
            flags.append("--" + name)
        if "action" not in kw and "choices" not in kw:
            kw["metavar"] = f.name.upper()
        parser.add_argument(*flags, dest=f"{param}:{name}", default=argparse.SUPPRESS, help=text, **kw)


def add_function_arguments(parser: argparse.ArgumentParser, fn: Callable[..., Any]) -> dict[str, type]:
    """Options for ``fn``'s parameters; returns {parameter: dataclass} of the parameters that expand."""
    hints = typing.get_type_hints(fn)
    helps = _param_help(inspect.getdoc(fn) or "")
    expanded: dict[str, type] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if dataclasses.is_dataclass(hints.get(name)):
            expanded[name] = hints[name]
            add_dataclass_arguments(parser, name, hints[name])
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
            if p.kind == p.KEYWORD_ONLY and p.default is None:
                kw["action"] = "extend"   # repeatable: --lora a=x --lora b=y, as well as --lora a=x b=y
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
    if expanded:
        parser.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                            help="YAML file whose keys are the options above (flags given here override it)")
    return expanded


def call_arguments(ns: argparse.Namespace, expanded: dict[str, type]) -> dict[str, Any]:
    """The keyword arguments of the command: plain options as parsed, dataclass parameters built
    from their defaults, the --config file and the flags given."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "_fn", "_expanded", "_config", "verbose")}
    kwargs = {k: v for k, v in given.items() if ":" not in k}
    for param, cls in expanded.items():
        flags = {k.split(":", 1)[1]: v for k, v in given.items() if k.startswith(param + ":")}
        kwargs[param] = options.build(cls, getattr(ns, "_config", None), flags)
    return kwargs


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: shown as one line, not a traceback."""
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
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == "llamaforge":
                raise   # a broken project module is a bug, not a missing optional dependency
            sub.add_parser(name, help=f"(unavailable: {e})")   # e.g. `serve` without fastapi
            continue
        doc = inspect.getdoc(fn) or ""
        sp = sub.add_parser(name, help=doc.split("\n")[0], description=doc.split("\n\n")[0])
        sp.set_defaults(_fn=fn, _expanded=add_function_arguments(sp, fn))
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(ns, "_fn", None):
        if ns.command:
            parser.error(f"command {ns.command!r} is not available in this installation")
        parser.print_help()
        return 2
    try:
        result = ns._fn(**call_arguments(ns, ns._expanded))
    except KeyboardInterrupt:
        return 130
    except user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llamaforge {ns.command}: error: {msg}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
