"""Undo common obfuscations before the guard scores a text.

``views(text)`` returns the texts the guard scores for one message: the message normalised
(zero-width characters removed, homoglyphs mapped to Latin letters, spaced-out letters joined,
leetspeak read as letters), and for encoded payloads (base64, hex, rot13) the message with each
payload decoded in place and each decoded payload on its own; the guard takes the most unsafe view.
Every step is conservative: a text with nothing obfuscated is scored as it is, once, so a plain
check costs no more than before.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata

# zero-width and invisible formatting characters used to split trigger words
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e"))

# Cyrillic and Greek letters that look like Latin ones (Unicode confusables, lower and upper case)
_HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "У": "Y", "Ѕ": "S", "І": "I", "Ј": "J",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "ν": "v",
    "χ": "x", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_NON_LATIN_LOOKALIKE = re.compile("[" + "".join(k for k in map(chr, _HOMOGLYPHS) if k) + "]")

# leetspeak: only inside words that also contain letters ("b0mb", "h@ck"), never in plain numbers,
# numbers with a unit or suffix ("15kg", "18th", "20s"), codes ending in digits ("RJ45", "CH4"), or
# symbols at a word's edge ("LGBTQ+", "wow!!!", "$5")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"})
_TOKEN = re.compile(r"[\w@$!|+€]+")
_EDGE = "@$!|+€_"
_NUMBER_UNIT = re.compile(r"\d+[A-Za-z]{1,3}")       # "15kg", "2nd", "20s"
_CODE = re.compile(r"[A-Za-z]+\d+")                   # "RJ45", "CH4", "MP3"


def _leet_word(tok: str, min_len: int, in_leet_text: bool = False) -> str | None:
    """The letters a leetspeak token stands for, or None when it is not one. In a text that already
    has leetspeak words, numbers with letters ("d0", "t0", "4nd", "573p") are read too."""
    # "@" and "$" at a word's edge are letters in a leetspeak text ("@t", "key$"), a handle or a
    # price elsewhere
    core = tok.rstrip("!+|_") if in_leet_text else tok.strip(_EDGE)
    if len(core) < min_len or not re.search(r"[A-Za-z]", core) or not re.search(r"[013457890@$!|+€]", core):
        return None
    if not in_leet_text and (_NUMBER_UNIT.fullmatch(core) or _CODE.fullmatch(core)):
        return None
    lo = tok.index(core)
    return tok[:lo] + core.translate(_LEET) + tok[lo + len(core):]


# letters separated by single spaces, dots, dashes or underscores: "b o m b", "k.i.l.l"
_SPACED = re.compile(r"(?<![A-Za-z])[A-Za-z](?:(?P<sep>[._\-*])[A-Za-z](?:(?P=sep)[A-Za-z])+|(?: {1,3}[A-Za-z]){2,})(?![A-Za-z])")


_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{12,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){8,}(?![0-9A-Fa-f])")
# a few of the most frequent English words: rot13 text has almost none, its decoding many
_COMMON = frozenset("the an and to of in is how you do for with on what can my me it make get this that be are "
                    "write give tell someone people without from your into their about who will not have all "
                    "there them she he his her so at by or as if we they no why did describe between two".split())
_WORD = re.compile(r"[A-Za-z]+")


def _printable(s: str) -> bool:
    """Decoded bytes that read as text: mostly letters and spaces, no control characters."""
    if not s or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in s):
        return False
    return sum(c.isalpha() or c == " " for c in s) >= 0.7 * len(s) and " " in s.strip()


def _decode_b64(token: str) -> str | None:
    if token.isalpha() and (token.islower() or token.isupper()):
        return None     # an ordinary long word, not base64
    try:
        s = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return s if _printable(s) else None


def _decode_hex(token: str) -> str | None:
    try:
        s = bytes.fromhex(re.sub(r"[ :]", "", token)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return s if _printable(s) else None


def _common(text: str) -> int:
    return sum(w.lower() in _COMMON for w in _WORD.findall(text))


def _rot13(text: str) -> str | None:
    """The rot13 decoding of ``text`` when it reads as English and ``text`` does not."""
    words = _WORD.findall(text)
    if len(words) < 3:
        return None
    decoded = codecs.decode(text, "rot13")
    before, after = _common(text), _common(decoded)
    return decoded if after >= 3 and after >= 0.25 * len(words) and after >= 2 * before + 2 else None


def _unspace(m: re.Match) -> str:
    # two or more spaces separate words ("h o w  t o"); a leading "a" or "I" is the article or
    # pronoun when at least three letters follow ("a b o m b" -> "a bomb")
    words = [re.sub(r"[ ._\-*]", "", w) for w in re.split(r"  +", m.group(0))]
    if len(words) == 1 and len(words[0]) >= 4 and words[0][0] in "aAI" and m.group(0)[1] == " ":
        words = [words[0][0], words[0][1:]]
    return " ".join(words)


def clean(text: str) -> str:
    """Character-level normalisation: NFKC (full-width and styled letters), zero-width characters
    removed, Cyrillic and Greek look-alikes mapped to Latin inside words that contain Latin letters
    (or are made only of look-alikes), letters spaced out joined, leetspeak words read as letters."""
    t = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    if _NON_LATIN_LOOKALIKE.search(t):
        # words made only of look-alikes are mapped too when the text is mostly Latin (not in Russian)
        latin = len(re.findall(r"[A-Za-z]", t)) > len(re.findall(r"[\u0370-\u04ff]", t))
        t = re.sub(r"\w+", lambda m: m.group(0).translate(_HOMOGLYPHS)
                   if re.search(r"[A-Za-z]", m.group(0)) or (latin and not _NON_LATIN_LOOKALIKE.sub("", m.group(0)))
                   else m.group(0), t)
    t = _SPACED.sub(_unspace, t)
    return _unleet(t)


def _unleet(t: str) -> str:
    """Leetspeak words read as letters; once a text has two, two-character ones ("d0", "t0"), a lone
    "@" and a possessive "'$" are read too."""
    n = sum(_leet_word(m.group(0), 3) is not None for m in _TOKEN.finditer(t))
    if not n:
        return t
    short = n >= 2

    def sub(m: re.Match) -> str:
        tok = m.group(0)
        if short and tok == "@":
            return "a"
        return _leet_word(tok, 2 if short else 3, short) or tok

    t = _TOKEN.sub(sub, t)
    return t.replace("'$", "'s") if short else t


def decode_payloads(text: str) -> list[tuple[str, str]]:
    """(encoded, decoded) pairs of the base64 and hex payloads in ``text``; the whole text's rot13
    reading when that reads as English and the text does not."""
    out = []
    for pat, dec in ((_B64, _decode_b64), (_HEX, _decode_hex)):
        for m in pat.finditer(text):
            d = dec(m.group(0).strip())
            if d is not None:
                out.append((m.group(0).strip(), d))
    if not out:
        r = _rot13(text)
        if r is not None:
            out.append((text, r))
        else:
            # rot13 of one quoted or trailing span ("decode this rot13: ...") after a cue word
            m = re.search(r"rot-?13\W+(.+)$", text, flags=re.I | re.S)
            if m and (r := codecs.decode(m.group(1), "rot13")) and _common(r) > _common(m.group(1)):
                out.append((m.group(1), r))
    return out


def views(text: str) -> list[str]:
    """The texts to score for one message: the message normalised (`clean`: the message itself when
    nothing is obfuscated), then, when it carries encoded payloads, the message with each payload
    replaced by its decoding and each decoding alone (normalised too); duplicates removed.

    Character-level disguises are undone *before* scoring (the spaced or zero-width-split original
    is not scored: its odd tokens only add noise), while a message with a payload is scored both as
    written and decoded, and counts as its most unsafe view."""
    payloads = decode_payloads(text)
    out = [text if payloads else clean(text)]   # cleaning would garble the payload as written
    whole = text
    for enc, dec in payloads:
        whole = whole.replace(enc, dec)
    for v in ([clean(whole)] if payloads else []) + [clean(d) for _, d in payloads]:
        if v.strip() and v.strip() not in {o.strip() for o in out}:
            out.append(v)
    return out


def paragraphs(text: str) -> list[str]:
    """Blank-line or '---' separated parts of a text, stripped, non-empty."""
    return [p.strip() for p in re.split(r"\n\s*\n|\n-{3,}\n", text) if p.strip() and p.strip("- \n")]


def scored_parts(text: str, deobfuscate: bool = True) -> list[str]:
    """Everything the default guard scores for one message; the message scores as the most unsafe.

    A mean-pooled embedding of a long message is dominated by its bulk: a harmful request after a
    pasted document scores as the document (and past 256 tokens it is cut off), so each paragraph
    is scored too. Each de-obfuscated view (`views`) is scored with its paragraphs (``deobfuscate``
    False: the message's own paragraphs only, the guard before issue 18, for comparison)."""
    out: list[str] = []
    seen: set[str] = set()
    for v in views(text) if deobfuscate else [text]:
        for s in [v] + paragraphs(v):
            if s.strip() not in seen:
                seen.add(s.strip())
                out.append(s)
    return out
