"""Chat formatting: Meta's Llama 2 `chat_completion` encoding, and sandboxed Jinja chat templates
(as transformers renders them) for models that ship one.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatFormatError",
    "validate_messages",
    "encode_chat",
    "render_template",
    "LLAMA2_TEMPLATE",
    "is_llama2_template",
    "B_INST",
    "E_INST",
    "B_SYS",
    "E_SYS",
]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

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


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox turns a forbidden attribute into an undefined that can still render as "";
    # failing at once makes a probing template an error instead of silent output.
    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


_ENV: ImmutableSandboxedEnvironment | None = None
_CACHE: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    global _ENV
    if _ENV is None:
        env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
        _ENV = env
    compiled = _CACHE.get(template)
    if compiled is None:
        compiled = _ENV.from_string(template)
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[template] = compiled
    return compiled


def render_template(template: str, messages, bos_token, eos_token, add_generation_prompt=True, **extra) -> str:
    """Render a chat template in a sandbox; template errors and sandbox violations raise ChatFormatError."""
    if not isinstance(template, str) or not template:
        raise ChatFormatError("chat template must be a non-empty string")
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token or "", eos_token=eos_token or "",
                                         add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.SecurityError as e:
        raise ChatFormatError(f"chat template tried an operation the sandbox forbids: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatFormatError(f"chat template error: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatFormatError(f"chat template failed: {type(e).__name__}: {e}") from e


def _token_text(tokenizer, i) -> str | None:
    return None if i is None else tokenizer.id_to_piece(i)


def encode_chat(tokenizer, messages, template: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a dialogue, ready for generation (or, with add_generation_prompt=False, for training).

    Llama 2 (a sentencepiece tokenizer without another template, or the Llama 2 template) goes through
    Meta's reference encoding; any other template is rendered and encoded with its control tokens parsed.
    """
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            if tokenizer.kind != "sentencepiece":
                raise ChatFormatError("the tokenizer has no chat template; pass template=...")
            return _encode_llama2(tokenizer, messages, add_generation_prompt)
    if is_llama2_template(template):
        return _encode_llama2(tokenizer, messages, add_generation_prompt)

    msgs = validate_messages(messages, llama2=False)
    # The rendered text is encoded with special=True, so control-token text inside a message would
    # become a real control token (e.g. a user closing their own turn with <|im_end|>).
    control = [t for t in _control_texts(tokenizer) if any(t in m["content"] for m in msgs)]
    if control:
        raise ChatFormatError(f"message content contains control token text {', '.join(map(repr, control))}")
    bos_text = _token_text(tokenizer, tokenizer.bos_id)
    eos_text = _token_text(tokenizer, tokenizer.eos_id)
    text = render_template(template, msgs, bos_text, eos_text, add_generation_prompt=add_generation_prompt)
    add_bos = bool(tokenizer.add_bos and tokenizer.bos_id is not None
                   and not (bos_text and text.startswith(bos_text)))
    return tokenizer.encode(text, bos=add_bos, eos=False, special=True)


def _control_texts(tokenizer) -> list[str]:
    if hasattr(tokenizer, "special_pieces"):
        return tokenizer.special_pieces()
    return sorted({tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)})
