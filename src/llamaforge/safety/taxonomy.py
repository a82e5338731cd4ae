"""The MLCommons hazard taxonomy (Llama Guard 2/3's S1-S14) and the mapping from the Llama Guard v1
codes (O1-O6, and llamaforge's O7) the default guard predicts.

An O-code is broader than one S-code (O1 "Violence and Hate" is both S1 and S10), so each O-code has
a default S-code and keyword rules on the checked text that pick a narrower one (O2 about a child is
S4, O3 about someone's home address is S7). S6 (specialized advice) has no O-code and is never
produced by the default guard.
"""
from __future__ import annotations

import re
from typing import Literal, Sequence

Taxonomy = Literal["llama-guard-1", "mlcommons"]
TAXONOMIES = ("llama-guard-1", "mlcommons")

MLCOMMONS: dict[str, str] = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy",
    "S8": "Intellectual Property", "S9": "Indiscriminate Weapons", "S10": "Hate",
    "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

# O-code -> (default S-code, [(S-code, pattern on the lower-cased text), ...] tried in order)
O_TO_S: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "O1": ("S1", [("S10", r"\b(hate|hateful|racis|slur|subhuman|inferior|bigot|nazi|white power|antisemit|homophob"
                   r"|transphob|xenophob|immigrants?|jews?|muslims?|blacks?|gays?)\b|discriminat")]),
    "O2": ("S12", [("S4", r"\b(child|children|minor|minors|kid|kids|underage|teen|teenager|\d{1,2}[- ]year[- ]old|"
                          r"twelve|eleven|ten|nine|eight)\b|csam|loli"),
                   ("S3", r"\b(rape|trafficking|traffick|sexual assault|molest|non-?consensual|revenge porn|sextort)"
                          r"|nude photos")]),
    "O3": ("S2", [("S7", r"\b(home address|phone number|social security|ssn|dox|doxx|personal information|"
                         r"private information|track (her|his|their|my)|location without|spy on|stalk)"),
                  ("S8", r"\b(pirat|copyright|torrent|crack(ed)? (software|version)|watermark|counterfeit)"),
                  ("S14", r"\b(code interpreter|sandbox escape|escape the sandbox|os\.system|rm -rf|fork bomb)"),
                  ("S1", r"\b(kidnap|murder|kill|assault|carjack|armed robbery)")]),
    "O4": ("S2", [("S9", r"\b(bomb|explosive|grenade|detonat|nuclear|uranium|plutonium|radiolog|dirty bomb|chemical"
                         r" weapon|nerve agent|sarin|vx|mustard gas|ricin|anthrax|bioweapon|biological weapon|"
                         r"pathogen|smallpox|cbrn|tnt|c-4|semtex)\b"),
                  ("S1", r"\b(shoot|massacre|attack|kill)")]),
    "O5": ("S2", []),
    "O6": ("S11", []),
    "O7": ("S2", [("S13", r"\b(election|ballot|vote|voting|voter|polling)"),
                  ("S5", r"\b(defam|libel|slander|smear|false (rumou?rs?|claims?) about)")]),
}

# what each S-code covers, for the documentation table (the O-codes it can come from)
S_FROM_O = {s: sorted({o for o, (d, rules) in O_TO_S.items() if d == s or any(r[0] == s for r in rules)})
            for s in MLCOMMONS}


def check_taxonomy(taxonomy: str) -> None:
    if taxonomy not in TAXONOMIES:
        raise ValueError(f"taxonomy must be one of {', '.join(TAXONOMIES)}, not {taxonomy!r}")


def to_mlcommons(code: str, text: str = "") -> str:
    """The MLCommons S-code for an O-code, refined by the checked ``text``. Unknown codes (a custom
    taxonomy's) are returned unchanged."""
    if code not in O_TO_S:
        return code
    default, rules = O_TO_S[code]
    t = text.lower()
    for s, pattern in rules:
        if re.search(pattern, t):
            return s
    return default


def mlcommons_labels(codes: Sequence[str], text: str = "") -> list[str]:
    """"S9: Indiscriminate Weapons"-style labels for O-codes, in order, without duplicates."""
    out: list[str] = []
    for c in codes:
        s = to_mlcommons(c, text)
        label = f"{s}: {MLCOMMONS[s]}" if s in MLCOMMONS else s
        if label not in out:
            out.append(label)
    return out
