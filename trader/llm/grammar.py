"""The answer format ``ACTION | confidence | reason``: a GBNF grammar for local generation and a
tolerant parser for text from backends without one.

LLM text is untrusted input: all it can ever contribute is one of the six actions, a confidence
in [0, 1] and a short reason. It never sets size, price or limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trader.domain import ACTION_NAMES, Action

REASON_MAX_CHARS = 80

ANSWER_GBNF = rf"""root ::= action " | " confidence " | " reason
action ::= "HOLD" | "BUY" | "SELL" | "MOVE_TO_BE" | "ENABLE_TRAIL" | "DISABLE_TRAIL"
confidence ::= "0." [0-9] [0-9] | "1.00"
reason ::= [^\n|]{{1,{REASON_MAX_CHARS}}}
"""


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    action: Action
    confidence: float
    reason: str


# Longest names first so MOVE_TO_BE is not read as something shorter; spaces, dashes and case vary.
_ACTION_RE = re.compile(
    r"\b(MOVE[\s_-]*TO[\s_-]*B(?:E|REAK[\s_-]*EVEN)|ENABLE[\s_-]*TRAIL(?:ING)?|DISABLE[\s_-]*TRAIL(?:ING)?"
    r"|HOLD|BUY|SELL)\b",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?|\.\d+)\s*(%?)")
_LABEL_RE = re.compile(r"\baction\s*[:=]\s*\**\s*([A-Za-z_ -]+)", re.IGNORECASE)
_MARKDOWN_RE = re.compile(r"[*`#>]+")


def _canonical(word: str) -> Action:
    w = re.sub(r"[\s_-]+", "_", word.upper())
    if w.startswith("MOVE"):
        return Action.MOVE_TO_BE
    if w.startswith("ENABLE"):
        return Action.ENABLE_TRAIL
    if w.startswith("DISABLE"):
        return Action.DISABLE_TRAIL
    return Action[w]


def _confidence(text: str) -> float | None:
    """The first number that reads as a confidence: 0..1, "85%", or a whole 0..100 ("85")."""
    for m in _NUMBER_RE.finditer(text):
        value = float(m.group(1))
        if m.group(2) == "%" or (value > 1.0 and value.is_integer()):
            value /= 100.0
        if 0.0 <= value <= 1.0:
            return value
        return None  # the first number is the confidence; out of range means unreadable
    return None


def parse_answer(text: str) -> ParsedAnswer | None:
    """The advice in ``text``, or None when it cannot be read without guessing.

    Accepts the strict form and common variations (case, spacing, markdown, an ``Action:`` label,
    percentages, extra words). Text naming several different actions outside a clear first field
    is ambiguous and gives None.
    """
    if not text or not text.strip():
        return None
    clean = _MARKDOWN_RE.sub("", text).strip()
    first_line = clean.splitlines()[0] if clean else ""
    action: Action | None = None
    rest = clean
    if "|" in first_line:
        fields = [f.strip() for f in first_line.split("|")]
        found = {_canonical(m.group(1)) for m in _ACTION_RE.finditer(fields[0])}
        if len(found) == 1:
            action = found.pop()
            rest = "|".join(fields[1:])
    if action is None:
        label = _LABEL_RE.search(clean)
        if label:
            m = _ACTION_RE.search(label.group(1))
            if m:
                action = _canonical(m.group(1))
                rest = clean[label.end() :]
    if action is None:
        found = {_canonical(m.group(1)) for m in _ACTION_RE.finditer(clean)}
        if len(found) != 1:
            return None
        action = found.pop()
        m = _ACTION_RE.search(clean)
        rest = clean[m.end() :] if m else clean
    conf = _confidence(rest)
    if conf is None:
        return None
    reason = (
        rest.split("|", 1)[1].strip() if "|" in rest else _NUMBER_RE.sub("", rest, count=1).strip(" :,-|")
    )
    return ParsedAnswer(action, round(conf, 4), reason[:REASON_MAX_CHARS])


def format_answer(action: Action, confidence: float, reason: str) -> str:
    """The canonical one-line form (used by the ensemble and in journals)."""
    reason = reason.replace("\n", " ").replace("|", "/")[:REASON_MAX_CHARS] or "-"
    return f"{ACTION_NAMES[action]} | {confidence:.2f} | {reason}"
