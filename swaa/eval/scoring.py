"""Scorers: how a prediction is judged against the gold answers, and accuracy by group.

A scorer is ``scorer(prediction, gold, example) -> float`` with ``gold`` a list of strings and the score in
[0, 1]. Built in: "exact" (normalized exact match with any gold item), "substring" (every gold item appears
in the prediction, normalized), "choice" (the multiple-choice letter the prediction picks equals the gold
letter). An LLM judge ``judge(question, gold, prediction) -> bool | float`` becomes a scorer via ``judge_scorer``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (as SQuAD's exact match)."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, gold: list[str], example=None) -> float:
    """1.0 when the normalized prediction equals any normalized gold item."""
    predicted = normalize(prediction)
    return float(any(predicted == normalize(item) for item in gold))


def substring_match(prediction: str, gold: list[str], example=None) -> float:
    """1.0 when every gold item appears, normalized, inside the normalized prediction (on word boundaries)."""
    predicted = f" {normalize(prediction)} "
    return float(all(f" {normalize(item)} " in predicted for item in gold if normalize(item)))


_CHOICE_PATTERNS = [
    re.compile(r"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-J])\b"),  # "the answer is (B)", "Answer: B"
    re.compile(r"\(([A-J])\)"),  # "(B)"
    re.compile(r"^\s*\**([A-J])(?:[.):\]]|\**\s*$)"),  # "B. Paris", "B)", "**B**" at the start
]
_LONE_LETTER = re.compile(r"\b([A-J])\b")  # last resort: the last standalone capital letter


def choice_letter(text: str) -> str | None:
    """The option letter (A-J) a text picks: "The answer is (C)", "(C)", "C. Paris", "C"; None if none."""
    text = str(text).strip()
    for pattern in _CHOICE_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    letters = _LONE_LETTER.findall(text)
    return letters[-1] if letters else None


def choice_match(prediction: str, gold: list[str], example=None) -> float:
    """1.0 when the letter the prediction picks equals the letter of any gold item ("B", "(B)", "B. text")."""
    picked = choice_letter(prediction)
    return float(picked is not None and any(choice_letter(item) == picked for item in gold))


SCORERS: dict[str, Callable] = {"exact": exact_match, "substring": substring_match, "choice": choice_match}


def judge_scorer(judge: Callable) -> Callable:
    """A scorer that asks ``judge(question, gold, prediction) -> bool | float`` (for example an LLM judge).

    ``question`` is the example's ``question`` (its prompt when absent); ``gold`` is the gold answer, a string
    when there is one item and a list otherwise. A float must lie in [0, 1]."""
    if not callable(judge):
        raise ValueError(f"judge={judge!r}: must be a callable judge(question, gold, prediction) -> bool | float")

    def score(prediction: str, gold: list[str], example=None) -> float:
        question = None
        if example is not None:
            question = example.question if example.question is not None else example.text
        verdict = judge(question, gold[0] if len(gold) == 1 else list(gold), prediction)
        if isinstance(verdict, bool):
            return float(verdict)
        if isinstance(verdict, (int, float)) and 0 <= verdict <= 1:
            return float(verdict)
        raise ValueError(f"judge returned {verdict!r}: must be a bool or a number in [0, 1]")

    score.__name__ = f"judge:{getattr(judge, '__name__', type(judge).__name__)}"
    return score


def get_scorer(scorer: str | Callable = "substring", judge: Callable | None = None) -> Callable:
    """The scorer for a name in SCORERS, a callable scorer, or "judge" (needs ``judge``); a given judge wins."""
    if judge is not None:
        return judge_scorer(judge)
    if callable(scorer):
        return scorer
    if scorer == "judge":
        raise ValueError("scorer='judge' needs a judge: pass judge=callable(question, gold, prediction) -> bool | float")
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r}: unknown; allowed: {', '.join(map(repr, SCORERS))}, 'judge' or a callable")
    return SCORERS[scorer]


def scorer_name(scorer: Callable) -> str:
    for name, known in SCORERS.items():
        if scorer is known:
            return name
    return getattr(scorer, "__name__", type(scorer).__name__)


DEFAULT_LENGTH_EDGES = (0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)


def _short(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def length_bin(tokens: int, edges=DEFAULT_LENGTH_EDGES) -> str:
    """The label of the bin ``[lo, hi)`` holding ``tokens``, such as "4k-8k"; past the last edge "256k+"."""
    edges = sorted(edges)
    for lo, hi in zip(edges, edges[1:]):
        if lo <= tokens < hi:
            return f"{_short(lo)}-{_short(hi)}"
    if tokens < edges[0]:
        return f"<{_short(edges[0])}"
    return f"{_short(edges[-1])}+"


def accuracy_by(records: list[dict], key: str) -> dict[str, dict]:
    """``{group: {"accuracy": mean score, "n": count}}`` over records grouped by ``record[key]``."""
    groups: dict[str, list[float]] = {}
    for record in records:
        groups.setdefault(str(record[key]), []).append(record["score"])
    return {group: {"accuracy": sum(scores) / len(scores), "n": len(scores)} for group, scores in groups.items()}
