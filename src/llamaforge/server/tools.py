"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) for /v1/chat/completions.

The model answers either in text or with one or more calls written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several separated by a newline): Hermes / Qwen's form. The form is enforced by an llguidance Lark
grammar whose arguments are each function's JSON schema (`%json`), so every call names a given
function and its arguments parse and validate. `ToolCallParser` turns that text back into OpenAI's
`tool_calls`, as it streams.

Templates that render tools themselves (`chat.supports_tools`) get the tools and the history as
they are; other templates (Llama 2's [INST], ChatML without tools) get `tool_prompt` in the system
message, earlier calls written in the form above and tool results as user turns within
<tool_response></tool_response>.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..chat import encode_chat, supports_tools
from .schemas import APIError
from .structured import MAX_SCHEMA_CHARS, StructuredOutputError, lark_grammar, schema_grammar

MAX_TOOLS = 128                          # functions per request (OpenAI's limit)
MAX_TOOLS_CHARS = 4 * MAX_SCHEMA_CHARS   # all of them as JSON (each compiles to a grammar per request)
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# generated and rendered arguments: json.dumps's separators, which tool-trained models have seen
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CHOICE_HELP = 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


@dataclass
class ToolPlan:
    """What a request's tools allow: the functions, which may be called, how many calls."""
    tools: list[dict[str, Any]]          # OpenAI's tool objects, as given
    choice: str                          # "auto" | "required" | "none" | a function's name
    parallel: bool

    @property
    def active(self) -> bool:
        """Whether the answer may hold calls (with "none" the tools are left out of the prompt)."""
        return self.choice != "none"

    @property
    def allowed(self) -> list[dict[str, Any]]:
        """The functions the answer may call."""
        fns = [t["function"] for t in self.tools]
        return fns if self.choice in ("auto", "required") else [f for f in fns if f["name"] == self.choice]


def plan(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool) -> ToolPlan | None:
    """The checked tools of a request (None without tools and tool_choice; 400s for malformed ones)."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools per request (got {len(tools)})", param="tools")
    size = len(json.dumps(tools))
    if size > MAX_TOOLS_CHARS:
        raise APIError(400, f"the tools take {size} characters of JSON; at most {MAX_TOOLS_CHARS}", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        fn = _function(tool, i)
        if fn["name"] in names:
            raise APIError(400, f"tools[{i}]: the function name {fn['name']!r} is given twice", param="tools")
        names.add(fn["name"])
    choice = _choice(tool_choice, names)
    if not tools:
        if choice not in ("auto", "none"):
            raise APIError(400, f"tool_choice {choice!r} needs tools: give the functions in tools",
                           param="tool_choice")
        return None
    return ToolPlan(tools, choice, parallel)


def _function(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise APIError(400, f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": '
                            '{...}}}', param="tools")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise APIError(400, f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes, "
                            f"got {str(name)[:80]!r}", param="tools")
    if not isinstance(fn.get("description", ""), str):
        raise APIError(400, f"{where}.function.description must be a string", param="tools")
    params = fn.get("parameters", {})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise APIError(400, f"{where}.function.parameters must be a JSON Schema of an object, such as "
                            '{"type": "object", "properties": {...}}', param="tools")
    try:
        schema_grammar(_arguments_schema(fn), f"{where}.function.parameters ({name})")
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="tools") from e
    return fn


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"{CHOICE_HELP}, not {tool_choice[:40]!r}", param="tool_choice")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (tool_choice.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise APIError(400, CHOICE_HELP, param="tool_choice")
    if fn["name"] not in names:
        raise APIError(400, f"tool_choice names the function {fn['name'][:80]!r}, which is not in tools "
                            f"({', '.join(sorted(names)) or 'none given'})", param="tool_choice")
    return fn["name"]


def _arguments_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """A function's arguments schema (no parameters: an object), in the layout generated."""
    return {"type": "object", **fn.get("parameters", {}), "x-guidance": JSON_STYLE}


# -- the grammar ---------------------------------------------------------------------------------
def grammar(p: ToolPlan, text_schema: Any = None) -> str:
    """The llguidance grammar of an answer: calls only (required, named) or text or calls (auto).
    Text may not contain "<tool_call>" (so an answer is one or the other); with a response_format
    (text_schema) the text must be that JSON instead."""
    rules, tail = [], json.dumps("}\n" + CLOSE)
    for k, fn in enumerate(p.allowed):
        head = f'{OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": '
        rules.append(f"fn{k}: {json.dumps(head)} %json {json.dumps(_arguments_schema(fn))} {tail}")
    once = not p.parallel or p.choice not in ("auto", "required")     # a named function: one call
    lines = [f"calls: {'call' if once else 'call (NL call)*'}",
             "NL: \"\\n\"",
             "call: " + " | ".join(f"fn{k}" for k in range(len(rules)))] + rules
    if p.choice == "auto":
        if text_schema is None:
            lines += ["start: TEXT | calls", f"TEXT: /(?s:.*)/ & ~/(?s:.*{re.escape(OPEN)}.*)/"]
        else:
            if isinstance(text_schema, dict):     # compact, as response_format alone is
                text_schema = {**text_schema, "x-guidance": {"whitespace_flexible": False}}
            lines += ["start: text | calls", f"text: %json {json.dumps(text_schema)}"]
    else:
        lines.insert(0, "start: calls")
    try:
        return lark_grammar("\n".join(lines), "the tools' grammar")
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="tools") from e


# -- the prompt ----------------------------------------------------------------------------------
def tool_prompt(p: ToolPlan) -> str:
    """The system-message section listing the tools, for templates that do not render them."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in p.tools)
    text = ("# Tools\n\nYou may call one or more functions to answer. Their signatures are JSON schemas "
            f"within <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
            "To call a function, answer with a JSON object of its name and arguments within "
            f"{OPEN}{CLOSE} tags:\n{OPEN}\n"
            '{"name": <function-name>, "arguments": <arguments-json-object>}\n'
            f"{CLOSE}\nThe results come back within <tool_response></tool_response> tags.")
    if p.choice == "required":
        text += "\nAnswer with a function call."
    elif p.choice != "auto":
        text += f"\nCall the function {p.choice}."
    return text


def check_history(messages: list[dict[str, Any]]) -> None:
    """400 for malformed tool_calls in assistant turns or tool turns without text content."""
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant" or not isinstance(calls, list):
                raise APIError(400, f"messages[{i}].tool_calls must be a list, on an assistant message",
                               param="messages")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                        and isinstance(fn.get("arguments", ""), str)):
                    raise APIError(400, f'messages[{i}].tool_calls[{j}] must be {{"id": ..., "type": "function", '
                                        '"function": {"name": ..., "arguments": "<JSON text>"}}', param="messages")
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise APIError(400, f"messages[{i}].tool_call_id must be a string", param="messages")


def _call_text(fn: dict[str, Any]) -> str:
    """A call as the model writes it (what the grammar generates, so a round trip reuses its prefix)."""
    return f'{OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": {fn.get("arguments") or "{}"}}}\n{CLOSE}'


def plain_messages(messages: list[dict[str, Any]], p: ToolPlan | None) -> list[dict[str, Any]]:
    """A tool conversation as plain system/user/assistant turns, for templates without tools."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
            if i and messages[i - 1].get("role") == "tool":     # results of parallel calls: one turn
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + content}
                continue
            role = "user"
        elif role == "assistant" and m.get("tool_calls"):
            content = "\n".join(([content] if content else []) + [_call_text(c["function"]) for c in m["tool_calls"]])
        out.append({"role": role, "content": content})
    if p is not None and p.active:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tool_prompt(p)}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt(p)})
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history for a template that renders tools: arguments as objects (what Hugging Face's
    templates expect), or left as text when they are not JSON."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                try:
                    fn["arguments"] = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    pass
                calls.append({**c, "type": "function", "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def encode(llm, messages: list[dict[str, Any]], p: ToolPlan | None) -> list[int]:
    """Prompt ids of a conversation with tools: by the model's template if it renders tools, else
    with the tool prompt."""
    template = llm.chat_template
    if supports_tools(template):
        return encode_chat(llm.tokenizer, template_messages(messages), template,
                           tools=p.tools if p is not None and p.active else None)
    return encode_chat(llm.tokenizer, plain_messages(messages, p), template)


# -- the answer ----------------------------------------------------------------------------------
# a call's head, once the arguments' "{" is there (so the whitespace before it is not in them)
_HEAD = re.compile(r'\s*<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')
_TAIL = re.compile(r"\s*\}\s*</tool_call>")


class ToolCallParser:
    """Generated text -> (content, OpenAI tool-call deltas), fed piece by piece.

    Text that may still become "<tool_call>" is held back; an answer that starts with it is calls.
    Each call's first delta carries its id and name, the next ones pieces of its arguments (a
    string scan finds where the arguments' JSON object ends).
    """

    def __init__(self):
        self.buf, self.mode, self.pos = "", None, 0      # mode: None (undecided), "text", "calls"
        self.calls = 0                                   # calls whose head was seen
        self.done = 0                                    # calls complete
        self.in_args = False
        self.depth, self.in_str, self.esc = 0, False, False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buf += text
        if self.mode is None:
            if self.buf.lstrip().startswith(OPEN):
                self.mode = "calls"
            elif OPEN.startswith(self.buf.lstrip()):
                return "", []
            else:
                self.mode = "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        return "", self._calls()

    def finish(self) -> str:
        """The text left at the end: held back, or a call whose head never came whole."""
        if self.mode == "calls" and self.calls:
            return ""
        out, self.buf = self.buf, ""
        return out

    def _calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if not self.in_args:
                m = _TAIL.match(self.buf, self.pos) if self.calls > self.done else None
                if m:
                    self.done, self.pos = self.done + 1, m.end()
                    continue
                m = _HEAD.match(self.buf, self.pos) if self.calls == self.done else None
                if not m:
                    return deltas
                self.pos, self.in_args, self.depth = m.end(), True, 0
                deltas.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}})
                self.calls += 1
            start = self.pos
            while self.pos < len(self.buf) and self.in_args:
                self._scan(self.buf[self.pos])
                self.pos += 1
            if self.pos > start:
                piece = self.buf[start:self.pos]
                if deltas and deltas[-1]["index"] == self.calls - 1:
                    deltas[-1]["function"]["arguments"] += piece
                else:
                    deltas.append({"index": self.calls - 1, "function": {"arguments": piece}})
            if self.in_args:
                return deltas

    def _scan(self, ch: str) -> None:
        """One character of the arguments: track strings and nesting; the object's end ends them."""
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
        elif ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.in_args = False

    @property
    def called(self) -> bool:
        return self.done > 0


def merge_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole tool calls from their streamed deltas."""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        if "id" in d:
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return calls
