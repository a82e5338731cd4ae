"""Chat formatting: Meta's Llama 2 `chat_completion` encoding, and sandboxed Jinja chat templates
(as transformers renders them) for models that ship one.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import threading
import time
from datetime import datetime
from typing import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatFormatError",
    "validate_messages",
    "encode_chat",
    "render_template",
    "LLAMA2_TEMPLATE",
    "is_llama2_template",
    "supports_tools",
    "B_INST",
    "E_INST",
    "B_SYS",
    "E_SYS",
]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")   # message fields a tool-calling template may read

# The chat template of Meta's Llama-2-*-chat-hf tokenizer_config.json, byte for byte.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


class ChatFormatError(ValueError):
    """A dialogue or chat template that cannot be encoded."""


def validate_messages(messages, *, llama2: bool = True, require_last_user: bool = True) -> list[dict]:
    """Check a dialogue and return it as plain `{"role", "content"}` dicts.

    With `llama2` (the default) Meta's reference rules apply: an optional system message first, then
    user/assistant alternating from user, ending with user when `require_last_user`.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not llama2:
        return out
    body = out[1:] if out[0]["role"] == "system" else out
    if not body:
        raise ChatFormatError("a system message must be followed by a user message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ChatFormatError(
                "roles must be 'system' (optional, first), then 'user' and 'assistant' alternating, "
                f"starting with 'user' (u/a/u/a/u...); message {i + len(out) - len(body)} is {m['role']!r}, "
                f"expected {want!r}")
    if require_last_user and body[-1]["role"] != "user":
        raise ChatFormatError(f"the last message must be from the user, got {body[-1]['role']!r}")
    return out


def _refuse_special_tags(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        found = [t for t in SPECIAL_TAGS if t in m["content"]]
        if found:
            raise ChatFormatError(
                f"message {i} ({m['role']}) contains {', '.join(found)}: special tags are not allowed as part "
                "of the prompt (Meta's reference marks such a dialogue unsafe)")


def _encode_llama2(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """Meta's reference `chat_completion` (llama/generation.py), token for token."""
    msgs = validate_messages(messages, require_last_user=add_generation_prompt)
    _refuse_special_tags(msgs)
    if msgs[0]["role"] == "system":
        msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    ids: list[int] = []
    for prompt, answer in zip(msgs[::2], msgs[1::2]):
        ids += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    if msgs[-1]["role"] == "user":
        ids += tokenizer.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def _normalize_template(template: str) -> str:
    return re.sub(r"\s+", "", template)


_LLAMA2_NORMALIZED = _normalize_template(LLAMA2_TEMPLATE)


def is_llama2_template(template: str | None) -> bool:
    """True for Meta's Llama 2 chat template (whitespace aside) or one rendering the same markers without a
    built-in default system prompt."""
    if not template:
        return False
    norm = _normalize_template(template)
    if norm == _LLAMA2_NORMALIZED:
        return True
    # The older HF variant adds DEFAULT_SYSTEM_MESSAGE; rendering it the reference way would drop that prompt.
    return (all(tag in template for tag in SPECIAL_TAGS) and "bos_token+'[INST]'" in norm
            and "eos_token" in norm and "default_system" not in template.lower())


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    # Underscore attributes on a namespace would be a way to reach interpreter internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


# Budgets of one rendering: a template is data from a checkpoint file, and a hostile one must fail
# quickly rather than hang a loader or a server request. Real chat templates render in milliseconds.
RENDER_SECONDS = 2.0
MAX_TEMPLATE_CHARS = 1 << 20        # real templates are a few KB
MAX_OUTPUT_CHARS = 1 << 20          # plus 4x the messages' own text (a template may quote a turn twice)
MAX_ARGUMENT = 1 << 20              # numbers passed to filters and methods (center(10**9), ljust, slice)


class _BudgetExceeded(Exception):
    pass


class _Budget(threading.local):
    deadline: float = math.inf
    max_chars: int = MAX_OUTPUT_CHARS


_BUDGET = _Budget()


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(value):
    if _size(value) > _BUDGET.max_chars:
        raise _BudgetExceeded(f"a value of {_size(value)} items exceeds the budget of {_BUDGET.max_chars}")
    return value


def _check_arguments(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_ARGUMENT:
            raise _BudgetExceeded(f"argument {v} is larger than {MAX_ARGUMENT}")


def _check_format(fmt) -> None:
    # a width or precision in a format string ("%0999999999d", "{:>999999999}") is one C call that
    # builds the whole string: refuse large ones before formatting
    if isinstance(fmt, str) and any(len(d) > 7 or int(d) > MAX_ARGUMENT for d in re.findall(r"\d+", fmt)):
        raise _BudgetExceeded(f"format string {fmt[:40]!r} asks for a width beyond {MAX_ARGUMENT}")


def _bounded_filter(name, f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_eval_context markers
    def run(*args, **kwargs):
        _check_arguments(args, kwargs)
        if name == "format":
            _check_format(next((a for a in args if isinstance(a, str)), None))
        return _check_size(f(*args, **kwargs))
    return run


def _bounded_join(join):
    # `~` compiles to str_join/markup_join, which the sandbox does not intercept: a doubling loop
    # would otherwise reach gigabytes
    def run(seq):
        parts = list(seq)
        if sum(_size(p) for p in parts) > _BUDGET.max_chars:
            raise _BudgetExceeded(f"a string beyond the budget of {_BUDGET.max_chars} characters")
        return join(parts)
    return run


def _trace(frame, event, arg):
    # line events of the template's own code only (tracing jinja's too costs 60% more): a template
    # loop meets the deadline within one iteration, and the loops inside filters and methods are
    # bounded by MAX_ARGUMENT and the size checks
    if frame.f_code.co_filename == "<template>":
        return _trace_lines(frame, event, arg)
    return None


def _trace_lines(frame, event, arg):
    if time.monotonic() > _BUDGET.deadline:
        raise _BudgetExceeded(f"rendering took longer than {RENDER_SECONDS} s")
    return _trace_lines


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox turns a forbidden attribute into an undefined that can still render as "";
    # failing at once makes a probing template an error instead of silent output.
    intercepted_binops = frozenset(("+", "*", "**", "%"))

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        # sizes are checked before * and ** compute (one C call could take gigabytes or minutes);
        # + is checked after, so repeated doubling stops at twice the budget
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq) * max(n, 0) > _BUDGET.max_chars:
                raise _BudgetExceeded(f"{_size(seq)} x {n} items exceed the budget of {_BUDGET.max_chars}")
        if operator == "%":
            _check_format(left)
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(abs(left), 2).bit_length() * right > 1 << 16:
                raise _BudgetExceeded(f"{left} ** {right} is too large")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_arguments(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # "...".format / format_map, checked when the template reaches for it
            _check_format(value.__self__)
        return wrapped


_ENV: ImmutableSandboxedEnvironment | None = None
_CACHE: dict[str, jinja2.Template] = {}


def _env() -> ImmutableSandboxedEnvironment:
    global _ENV
    if _ENV is None:
        env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
        _ENV = env
    return _ENV


def _compile(template: str) -> jinja2.Template:
    compiled = _CACHE.get(template)
    if compiled is None:
        compiled = _env().from_string(template)
        names = compiled.root_render_func.__globals__  # the namespace the template's code runs in
        names["str_join"], names["markup_join"] = _bounded_join(str_join), _bounded_join(markup_join)
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[template] = compiled
    return compiled


def _render(template: str, context: dict, max_chars: int) -> str:
    """Compile and render under the time and size budgets (the tracer is this thread's only)."""
    _BUDGET.deadline, _BUDGET.max_chars = time.monotonic() + RENDER_SECONDS, max_chars
    previous = sys.gettrace()
    sys.settrace(_trace)
    try:
        parts, total = [], 0
        for piece in _compile(template).generate(**context):
            total += len(piece)
            if total > max_chars:
                raise _BudgetExceeded(f"the output exceeds the budget of {max_chars} characters")
            parts.append(piece)
        return "".join(parts)
    finally:
        sys.settrace(previous)
        _BUDGET.deadline = math.inf


def render_template(template: str, messages, bos_token, eos_token, add_generation_prompt=True, **extra) -> str:
    """Render a chat template in a sandbox, under a time and output-size budget; template errors,
    sandbox violations and exceeded budgets raise ChatFormatError."""
    if not isinstance(template, str) or not template:
        raise ChatFormatError("chat template must be a non-empty string")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatFormatError(f"chat template of {len(template)} characters exceeds {MAX_TEMPLATE_CHARS}")
    text_size = sum(len(m.get("content") or "") for m in messages if isinstance(m, Mapping)
                    and isinstance(m.get("content"), str)) if isinstance(messages, Sequence) else 0
    context = dict(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                   add_generation_prompt=add_generation_prompt, **extra)
    try:
        return _render(template, context, MAX_OUTPUT_CHARS + 4 * text_size)
    except _BudgetExceeded as e:
        raise ChatFormatError(f"chat template exceeded its budget: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatFormatError(f"chat template tried an operation the sandbox forbids: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatFormatError(f"chat template error: {e}") from e
    except (RecursionError, MemoryError, OverflowError) as e:
        raise ChatFormatError(f"chat template is too deep or too large: {type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatFormatError(f"chat template failed: {type(e).__name__}: {e}") from e


def _token_text(tokenizer, i) -> str | None:
    return None if i is None else tokenizer.id_to_piece(i)


@functools.lru_cache(maxsize=8)
def supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template renders tools: it reads the `tools` variable (Llama 2's does not)."""
    if not isinstance(template, str) or not template or len(template) > MAX_TEMPLATE_CHARS \
            or is_llama2_template(template):
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_env().parse(template))
    except jinja2.exceptions.TemplateError:
        return False


def _tool_messages(messages) -> list[dict]:
    """A dialogue for a tool-calling template: the roles of validate_messages and "tool"; tool_calls,
    tool_call_id and name kept (the caller checked their shape); an assistant turn with tool calls
    may have no content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        return validate_messages(messages, llama2=False)     # its error
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        plain = {k: v for k, v in m.items() if k not in TOOL_KEYS and k != "role"}
        if m.get("role") == "tool" or (m.get("role") == "assistant" and m.get("tool_calls")):
            plain["content"] = plain.get("content") or ""
            plain["role"] = "user"                      # checked as a user turn would be
        else:
            plain["role"] = m.get("role")
        checked = validate_messages([plain], llama2=False)[0]
        out.append({**checked, "role": m["role"], **{k: m[k] for k in TOOL_KEYS if k in m}})
    return out


def encode_chat(tokenizer, messages, template: str | None = None, add_generation_prompt: bool = True,
                tools: list | None = None) -> list[int]:
    """Token ids of a dialogue, ready for generation (or, with add_generation_prompt=False, for training).

    Llama 2 (a sentencepiece tokenizer without another template, or the Llama 2 template) goes through
    Meta's reference encoding; any other template is rendered and encoded with its control tokens parsed.
    A template that supports tools (`supports_tools`) also takes "tool" turns, assistant turns with
    tool_calls, and `tools` (OpenAI's list of {"type": "function", "function": {...}}).
    """
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            if tokenizer.kind != "sentencepiece":
                raise ChatFormatError("the tokenizer has no chat template; pass template=...")
            return _encode_llama2(tokenizer, messages, add_generation_prompt)
    if is_llama2_template(template):
        return _encode_llama2(tokenizer, messages, add_generation_prompt)

    with_tools = supports_tools(template)
    if tools and not with_tools:
        raise ChatFormatError("this chat template does not render tools")
    msgs = _tool_messages(messages) if with_tools else validate_messages(messages, llama2=False)
    # The rendered text is encoded with special=True, so control-token text inside a message would
    # become a real control token (e.g. a user closing their own turn with <|im_end|>); tool
    # definitions and calls are rendered too
    texts = [m["content"] for m in msgs] + [json.dumps([m.get(k) for k in TOOL_KEYS], ensure_ascii=False)
                                            for m in msgs if any(k in m for k in TOOL_KEYS)]
    if tools:
        texts.append(json.dumps(tools, ensure_ascii=False))
    control = [t for t in _control_texts(tokenizer) if any(t in x for x in texts)]
    if control:
        raise ChatFormatError(f"message content contains control token text {', '.join(map(repr, control))}")
    bos_text = _token_text(tokenizer, tokenizer.bos_id)
    eos_text = _token_text(tokenizer, tokenizer.eos_id)
    extra = {"tools": tools} if tools else {}
    text = render_template(template, msgs, bos_text, eos_text, add_generation_prompt=add_generation_prompt, **extra)
    add_bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None
                   and not (bos_text and text.startswith(bos_text)))
    return tokenizer.encode(text, bos=add_bos, eos=False, special=True)


def _control_texts(tokenizer) -> list[str]:
    if hasattr(tokenizer, "special_pieces"):
        return tokenizer.special_pieces()
    return sorted({tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)})
