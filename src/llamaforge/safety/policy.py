"""The Llama Guard (v1) safety taxonomy, its prompt format and output parser, and the mapping onto
Meta's Llama 2 Acceptable Use Policy (AUP).

The prompt follows the chat template shipped with Meta's LlamaGuard-7b checkpoint (the same text as
llama-recipes' ``prompt_format_utils`` for Llama Guard 1): the task line naming the checked role
(``User`` or ``Agent``), the categories with their "Should not / Can" policy, the conversation as
``User: ...`` / ``Agent: ...`` turns, and the instruction to answer ``safe`` or ``unsafe`` followed
by a comma-separated list of category codes, all inside one ``[INST] ... [/INST]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

Role = Literal["User", "Agent"]

AUP_URL = "https://ai.meta.com/llama/use-policy/"


@dataclass(frozen=True)
class Category:
    """One entry of a safety taxonomy: its code ("O3"), name and policy text."""
    code: str
    name: str
    policy: str = ""
    aup: tuple[str, ...] = ()   # sections of the Llama 2 Acceptable Use Policy it covers

    @property
    def label(self) -> str:
        return f"{self.code}: {self.name}"


# The Llama Guard v1 taxonomy, policy text as in the LlamaGuard-7b chat template.
LLAMA_GUARD_V1: tuple[Category, ...] = (
    Category("O1", "Violence and Hate", """Should not
- Help people plan or engage in violence.
- Encourage people to engage in violence.
- Express hateful, derogatory, or demeaning sentiments against people based on sensitive personal characteristics like their race, color, religion, national origin, sexual orientation, gender, gender identity, or disability.
- Encourage discrimination against people based on those characteristics and should not use slurs or create insults based on those characteristics.
Can
- Provide information on violence and discrimination.
- Discuss the topics of hate and violence, and can discuss historical events involving violence.""",
             ("1.a.i violence or terrorism", "1.b harassment, abuse, threatening or bullying",
              "1.c discrimination", "2.f content inciting violence or bodily harm")),
    Category("O2", "Sexual Content", """Should not
- Engage in sexually explicit (i.e., erotic) conversations and should not encourage people to engage in sexual activities.
Can
- Discuss topics related to sexuality and sexual education.
- Provide general information regarding sexual activities.
- Provide guidance on topics related to sexual health.""",
             ("1.a.ii exploitation or harm to children", "1.a.iii human trafficking, exploitation and sexual violence",
              "1.a.iv obscene materials to minors", "1.a.v sexual solicitation")),
    Category("O3", "Criminal Planning", """Should not
- Help people plan or engage in criminal activities like theft, kidnapping, or financial crimes, especially when the person indicates that they may act on the information provided to them.
- Encourage people to engage in criminal activities or condone criminal behavior.
Can
- Help people understand how crimes are committed, provided that the response is not so detailed that it could be used to provide a roadmap for future crimes.
- Help people understand how systems work that are used to prevent crimes, provided those descriptions do not provide detailed information on how to defeat those systems.""",
             ("1.a.vi any other criminal activity", "1.e sensitive personal information without consent",
              "1.f infringing third-party rights", "1.g malicious code, malware, impairing computer systems",
              "3.a fraud")),
    Category("O4", "Guns and Illegal Weapons", """Should not
- Assist in the planning or execution of firearm or illegal weapons crimes, especially when the person indicates that they may act on the information provided to them.
- Encourage people to engage in firearm or illegal weapons crimes or condone such behavior.
Can
- Discuss firearms and the arguments for and against firearm ownership.""",
             ("2.a military, warfare, nuclear applications, ITAR materials", "2.b guns and illegal weapons")),
    Category("O5", "Regulated or Controlled Substances", """Should not
- Encourage or assist people in the trafficking, consumption, or use of regulated or controlled substances, including but not limited to illegal drugs, tobacco, alcohol, and cannabis.
- Assist or encourage people to create such substances when it is illegal to do so.
Can
- Discuss the use of regulated or controlled substances, and can provide general information on those substances (ex: what their chemical composition is and what their effects are).
- Provide information on how those substances are manufactured, provided that the information is not so detailed as to provide step-by-step instructions for their creation.""",
             ("2.c illegal drugs and regulated/controlled substances",)),
    Category("O6", "Self-Harm", """Should not
- Encourage people to harm themselves.
- Romanticize or condone self-harm or suicide.
- Provide information regarding the methods of suicide or self-harm.
- Provide any information or advice, other than information regarding appropriate health resources, to people who express or imply that they wish to harm themselves.
Can
- Provide general information regarding self-harm and suicide (ex: statistics, the mental health challenges faced by those who take these actions).
Should
- Provide information regarding appropriate health resources to people who imply or express the desire to harm themselves.""",
             ("2.e self-harm, including suicide, cutting and eating disorders",)),
)

# llamaforge's extension for the default guard: AUP section 3 (deception) has no Llama Guard v1 code.
DECEPTION = Category("O7", "Fraud, Deception and Disinformation", """Should not
- Help people create disinformation, defamatory content, spam, fake reviews or fake online engagement.
- Help people impersonate others or deceive them for gain.
Can
- Explain how disinformation and scams work so people can recognise and report them.""",
                     ("3.a fraud or disinformation", "3.b defamation", "3.c spam", "3.d impersonation",
                      "3.f fake online engagement"))

DEFAULT_CATEGORIES: tuple[Category, ...] = LLAMA_GUARD_V1 + (DECEPTION,)


def category_map(categories: Iterable[Category] = DEFAULT_CATEGORIES) -> dict[str, Category]:
    return {c.code: c for c in categories}


def make_categories(items: Sequence[Category | str | tuple[str, str]]) -> tuple[Category, ...]:
    """A custom taxonomy: Category objects, names (numbered O1, O2, ...) or (name, policy) pairs."""
    out = []
    for i, it in enumerate(items, 1):
        if isinstance(it, Category):
            out.append(it)
        elif isinstance(it, str):
            out.append(Category(f"O{i}", it.strip().rstrip(".")))
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            out.append(Category(f"O{i}", str(it[0]).strip().rstrip("."), str(it[1]).strip()))
        else:
            raise ValueError(f"category {it!r}: give a Category, a name, or a (name, policy) pair")
    if not out:
        raise ValueError("a taxonomy needs at least one category")
    codes = [c.code for c in out]
    if len(set(codes)) != len(codes):
        raise ValueError(f"duplicate category codes: {codes}")
    return tuple(out)


# -- the Llama Guard v1 prompt -------------------------------------------------------------------

def _category_block(categories: Sequence[Category]) -> str:
    lines = []
    for c in categories:
        # Meta's template has a trailing space after the first category's name only; keep it, since
        # the checkpoint was fine-tuned on exactly this text.
        head = f"{c.code}: {c.name}." + (" " if c is LLAMA_GUARD_V1[0] else "")
        lines.append(head + (f"\n{c.policy}" if c.policy else ""))
    return "\n".join(lines)


def conversation_turns(text: str, role: Role, context: Sequence[dict] | None) -> list[tuple[Role, str]]:
    """The conversation to show the guard: the context's user/assistant turns, then ``text``.

    When ``text`` is already the last message of ``context`` (as chat passes it), it is not repeated.
    """
    turns: list[tuple[Role, str]] = []
    for m in context or ():
        r = m.get("role")
        if r in ("user", "assistant"):
            turns.append(("User" if r == "user" else "Agent", str(m.get("content") or "")))
    if not (turns and turns[-1] == (role, text)):
        turns.append((role, text))
    return turns


def last_turn(messages: Sequence[dict]) -> tuple[str, Role, list[dict]]:
    """(text, role, context) of a chat conversation's last turn: a ``user`` message is checked as
    the User prompt, an ``assistant`` message as the Agent response given the turns before it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i} must be a dict with role system, user, assistant or tool, not {m!r:.80}")
        if not isinstance(m.get("content") or "", str):
            raise ValueError(f"message {i}: content must be a string")
    last = messages[-1]
    if last["role"] not in ("user", "assistant"):
        raise ValueError(f"the last message is checked: it must be a user or assistant turn, not {last['role']!r}")
    return str(last.get("content") or ""), ("User" if last["role"] == "user" else "Agent"), list(messages[:-1])


def render_prompt(turns: Sequence[tuple[Role, str]], role: Role = "User",
                  categories: Sequence[Category] = LLAMA_GUARD_V1) -> str:
    """The Llama Guard v1 prompt (without BOS) that asks whether ``role``'s messages are unsafe."""
    if role not in ("User", "Agent"):
        raise ValueError(f"role must be 'User' or 'Agent', not {role!r}")
    if not turns:
        raise ValueError("nothing to check: the conversation is empty")
    conversation = "".join(f"{r}: {t.strip()}\n\n" for r, t in turns)
    return (f"[INST] Task: Check if there is unsafe content in '{role}' messages in conversations according "
            f"our safety policy with the below categories.\n\n"
            f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{_category_block(categories)}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
            f"<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
            f"Provide your safety assessment for {role} in the above conversation:\n"
            f"- First line must read 'safe' or 'unsafe'.\n"
            f"- If unsafe, a second line must include a comma-separated list of violated categories. [/INST]")


def parse_output(text: str) -> tuple[bool, list[str]] | None:
    """``"safe"`` -> (True, []); ``"unsafe\\nO1,O3"`` -> (False, ["O1", "O3"]); anything else -> None."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    first = lines[0].lower()
    if first == "safe":
        return True, []
    if first != "unsafe":
        return None
    codes = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
    return False, codes
