"""The answer format ``ACTION | confidence | reason``: a GBNF grammar for local generation and a
tolerant parser for text from backends without one.

LLM text is untrusted input: all it can ever contribute is one of the six actions, a confidence
in [0, 1] and a short reason. It never sets size, price or limits. A confidence that is negative,
above 1, NaN or infinite makes the answer unreadable: it is never folded into range (``-0.5`` is
not 0.5), because an answer that states it is nonsense cannot be trusted for its action either.
Text is capped at ``ANSWER_MAX_CHARS`` before it is parsed or journaled (see :func:`cap_answer`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from trader.domain import ACTION_NAMES, Action

REASON_MAX_CHARS = 80
# The longest answer text kept, parsed or journaled. A well-formed answer is one line of under
# 100 characters; a chatty backend at max_new_tokens (<= 512) stays within a few KB. Longer text
# means the backend ignored its limits: it is cut here and the answer counts as truncated.
ANSWER_MAX_CHARS = 8192
TRUNCATED_MARK = " [truncated]"

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
# A number as the model may write a confidence, with its sign when one is attached ("-0.5",
# "\u22120.5") and an exponent; or a word for a non-finite value. ASCII digits only.
_NUMBER_RE = re.compile(
    r"(?<![0-9.])([-+\u2212]?)([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE]([-+]?[0-9]{1,4}))?\s*(%?)"
    r"|\b(nan|inf(?:inity)?)\b",
    re.IGNORECASE,
)
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
    """The first number in ``text`` read as a confidence: 0..1, "85%", or a whole 0..100 ("85").

    The first number is the confidence: when it is negative, over 1 (after the percent rule),
    NaN or infinite, the answer is unreadable (None), never folded into range.
    """
    m = _NUMBER_RE.search(text)
    if m is None or m.group(5) is not None:  # no number, or "nan" / "inf" where it should be
        return None
    sign, digits, exponent, percent = m.group(1), m.group(2), m.group(3), m.group(4)
    if sign in ("-", "\u2212"):
        return None
    value = float(digits + (f"e{exponent}" if exponent else ""))
    if percent == "%" or (value > 1.0 and value.is_integer()):
        value /= 100.0
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return None
    return value


def parse_answer(text: str) -> ParsedAnswer | None:
    """The advice in ``text``, or None when it cannot be read without guessing.

    Accepts the strict form and common variations (case, spacing, markdown, an ``Action:`` label,
    percentages, extra words). Text naming several different actions outside a clear first field
    is ambiguous and gives None. A negative, out-of-range, NaN or infinite confidence gives None.
    ``text`` should already be capped (:func:`cap_answer`): the parser is linear, but the bar path
    should not run it over megabytes.
    """
    if not text or not text.strip():
        return None
    clean = _MARKDOWN_RE.sub("", text).strip()
    first_line = clean.splitlines()[0] if clean else ""
    action: Action | None = None
    rest = clean
    piped = False
    if "|" in first_line:
        fields = [f.strip() for f in first_line.split("|")]
        found = {_canonical(m.group(1)) for m in _ACTION_RE.finditer(fields[0])}
        if len(found) == 1:
            action = found.pop()
            rest = "|".join(fields[1:])
            piped = True
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
    # In the "ACTION | confidence | reason" form the confidence is the second field and nowhere
    # else: a reason's number ("2 lower highs") is never read as one.
    conf = _confidence(rest.split("|", 1)[0] if piped else rest)
    reason = ""
    if conf is None and piped and rest.count("|") >= 1:
        # "ACTION | reason | confidence": the last field, when the second holds no confidence
        head, _, last = rest.rpartition("|")
        if _BARE_NUMBER_RE.fullmatch(last.strip()):  # a bare number, never a reason's "2 lows"
            conf = _confidence(last)
            reason = head.strip()
    if conf is None:
        return None
    if not reason:
        reason = (
            rest.split("|", 1)[1].strip() if "|" in rest else _NUMBER_RE.sub("", rest, count=1).strip(" :,-|")
        )
    return ParsedAnswer(action, round(conf, 4), reason[:REASON_MAX_CHARS])


_BARE_NUMBER_RE = re.compile(r"[+\-\u2212]?(\d+(\.\d*)?|\.\d+)\s*%?")


def cap_answer(text: str) -> tuple[str, bool]:
    """``text`` cut to ``ANSWER_MAX_CHARS`` and marked as cut (``TRUNCATED_MARK``), and whether it
    was. Idempotent: a cut text read back from a journal is cut again, so a recorded replay
    treats it as the run that recorded it did (no advice)."""
    if len(text) <= ANSWER_MAX_CHARS:
        return text, False
    return text[:ANSWER_MAX_CHARS] + TRUNCATED_MARK, True


def format_answer(action: Action, confidence: float, reason: str) -> str:
    """The canonical one-line form (used by the ensemble and in journals)."""
    reason = reason.replace("\n", " ").replace("|", "/")[:REASON_MAX_CHARS] or "-"
    return f"{ACTION_NAMES[action]} | {confidence:.2f} | {reason}"
