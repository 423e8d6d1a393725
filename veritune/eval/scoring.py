"""Answer scoring: exact match, token F1, numeric match and abstention.

Normalisation follows SQuAD (lower case, no punctuation or articles, single spaces), so
"$149." and "149" match; every score is in [0, 1] per question.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation.replace("-", "") + "\u2013\u2014")
_NUMBER = re.compile(r"(?<![A-Za-z])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")  # not model codes like K3

# Phrases a grounded model uses to decline; matched after normalisation.
ABSTAIN_PATTERNS = [
    r"\b(documents?|context|passages?) (do|does)(n't| not) (say|mention|state|contain|specify)",
    r"\b(not|no) (mentioned|stated|specified|provided|available|information)\b",
    r"\b(cannot|can't|could not|couldn't|unable to) (find|answer|determine|tell)",
    r"\bi (do not|don't) know\b",
    r"\bno (such|information|answer)\b",
]
_ABSTAIN = re.compile("|".join(ABSTAIN_PATTERNS))
_ABSTAIN_ANY_CASE = re.compile("|".join(ABSTAIN_PATTERNS), re.IGNORECASE)


def normalize_answer(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_abstention(answer: str) -> bool:
    """Whether the answer *says* it declines. Whether it *is* an abstention also depends on
    what else it asserts ("The documents do not say, but it costs $999." is an answer):
    `veritune.eval.groundedness.abstains` decides that, and every metric uses it."""
    # Apostrophes matter to the patterns, so match before punctuation is stripped.
    text = " ".join(answer.lower().replace("\u2019", "'").split())
    return bool(_ABSTAIN.search(text))


def refusal_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each refusal phrase in `text`, whose whitespace must be single spaces
    and apostrophes straight (as `is_abstention` matches them), case kept."""
    return [m.span() for m in _ABSTAIN_ANY_CASE.finditer(text)]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text.replace("$", ""))]


def numeric_match(prediction: str, golds: Sequence[str]) -> float | None:
    """1 if the prediction holds every number of some gold answer; None if no gold has one."""
    gold_sets = [numbers(g) for g in golds if numbers(g)]
    if not gold_sets:
        return None
    if exact_match(prediction, golds):
        return 1.0  # "eight" for golds ["eight", "8"]: the number, spelt out
    pred = set(numbers(prediction))
    return float(any(set(g) <= pred for g in gold_sets))


def score_answer(prediction: str, question: dict, abstained: bool | None = None) -> dict:
    """Per-question scores; answerable and unanswerable questions get different fields.
    `abstained`: whether the reply is an abstention, as `veritune.eval.groundedness.abstains`
    judges it from the passages (None: whether it says it declines, `is_abstention`)."""
    if abstained is None:
        abstained = is_abstention(prediction)
    if not question["answers"]:
        return {"abstained": float(abstained)}
    scores = {
        "em": 0.0 if abstained else exact_match(prediction, question["answers"]),
        "f1": 0.0 if abstained else token_f1(prediction, question["answers"]),
        "abstained": float(abstained),
    }
    nm = numeric_match(prediction, question["answers"])
    if nm is not None:
        scores["numeric_match"] = 0.0 if abstained else nm
    return scores


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def bootstrap_ci(values: Sequence[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[min(samples - 1, int(0.975 * samples))]


def with_ci(values: Sequence[float], bootstrap_samples: int) -> dict[str, Any]:
    """Mean, 95% bootstrap interval and n of per-question values."""
    lo, hi = bootstrap_ci(list(values), bootstrap_samples)
    return {
        "mean": round(mean(values), 4) if values else None,
        "ci95_low": round(lo, 4) if values else None,
        "ci95_high": round(hi, 4) if values else None,
        "n": len(values),
    }


def paired_difference(a: Sequence[float], b: Sequence[float], bootstrap_samples: int) -> dict[str, Any]:
    """Mean of a - b over the same questions, with a paired bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    return with_ci([x - y for x, y in zip(a, b)], bootstrap_samples)
