"""Groundedness of a RAG answer: which of its claims the retrieved contexts support.

Deterministic and model-free, so it can score any RAG output (ours or another system's):

    from veritune.eval.groundedness import score_groundedness
    score_groundedness(question, contexts, answer)
    # {"score": 0.5, "label": "unsupported", "unsupported_claims": [...], "n_claims": 2}

An answer is cut into claims (`veritune.eval.claims`: numbers with their unit, dates, codes,
capitalised entity names and the remaining content words, "terms") and each claim is looked
up in the contexts and the question after normalisation (`Evidence`). The score is the weighted share of supported
claims; specific facts (numbers, dates, codes, entities) weigh 1.0 and terms 0.25, because a
paraphrase changes words while a hallucination usually changes a fact.

From the shell: `veritune score answers.jsonl` (see `veritune/cli.py`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from typing import Any

from veritune.eval.claims import (
    CODE,
    KINDS,
    NUM,
    STOPWORDS,
    UNIT_ALIASES,
    WEIGHTS,
    Claim,
    blank,
    extract_claims,
    find_dates,
    find_numbers,
    stem,
    tokens,
    unit_of,
)
from veritune.eval.scoring import is_abstention, refusal_spans


class Evidence:
    """The sources of one answer, indexed once so that every claim is a set lookup.

    `question` (the first source when scoring) decides which arithmetic the answer may do:
    a derived number is only looked for where the question asks for one (a total, a
    difference, a discounted price, a date), and from the stated quantities it is about."""

    def __init__(self, sources: Sequence[str], question: str | None = None):
        self.dates: set[tuple] = set()
        self.numbers: set[tuple[float, str | None]] = set()
        self.codes: set[str] = set()
        self.lower_words: set[str] = set()
        self.stems: set[str] = set()
        self.joined: list[str] = []
        # (value, unit, content stems of its source), in order, for arithmetic
        self.quantities: list[tuple[float, str | None, frozenset[str]]] = []
        self.rates: list[tuple[float, str, str, frozenset[str]]] = []  # (value, unit, per unit, source stems)
        self.full_dates: list[date] = []
        self.question = question
        self.question_stems = frozenset(_content_stems(question or ""))
        self.counts = _counts(question or "")
        for source in sources:
            context = frozenset(_content_stems(source))
            for sentence in _SENTENCE_SPLIT.split(source):
                self._add_sentence(sentence, context)
            words = tokens(source)
            self.joined.append(" " + " ".join(words) + " ")
            self.stems.update(stem(t) for t in words)
            self.lower_words.update(w for w in re.findall(r"\b[a-z][a-z]*\b", source))

    def _add_sentence(self, sentence: str, context: frozenset[str]) -> None:
        """Sentence by sentence, so that a rate is never read across a sentence boundary."""
        dates, rest = find_dates(sentence)
        self.dates.update(key for _, key in dates)
        # Dates also count as plain numbers ("2024" said on its own).
        self.numbers.update((float(v), None) for _, key in dates for v in key if v is not None)
        self.codes.update(_code_key(m.group(0)) for m in CODE.finditer(rest))
        rest = CODE.sub(" ", rest)
        numbers, _ = find_numbers(rest)
        for _, values, unit in numbers:
            self.numbers.update((v, unit) for v in values)
            self.quantities += [(v, unit, context) for v in values]
        self.rates += [(*rate, context) for rate in _rates(rest)]
        for _, (y, m, d) in dates:
            if y is not None and d is not None:
                try:
                    self.full_dates.append(date(y, m, d))
                except ValueError:
                    pass

    def _asks(self, operation: str) -> bool:
        """Whether the question calls for this kind of arithmetic (any, without a question)."""
        return not self.question or bool(_ASKS[operation].search(self.question))

    def _relevant(self, items: list) -> list:
        """The rates, percentages or periods from sources that share a content word with the
        question (a passage about another product's warranty gives no period to a question
        about returns); all of them if none does."""
        if not self.question_stems:
            return items
        near = [it for it in items if it[-1] & self.question_stems]
        return near or items

    @functools.cached_property
    def derived_numbers(self) -> set[tuple[float, str | None]]:
        """Quantities one unit-consistent arithmetic step away from stated ones, where the
        question asks for that step: sums of two or three like quantities and differences of
        two (years also counted in months, weeks in days); a quantity times a rate *per its
        unit* ("3 points for every $1" x "$139" = "417 points", in the rate's unit); a
        count the question states times a quantity; a price less, plus or times a
        percentage. Products of unrelated quantities ($219 x 3 days) are never derived."""
        out: set[tuple[float, str | None]] = set()
        qs: list[tuple[float, str, int]] = []
        for i, (v, u, _) in enumerate(self.quantities):
            if u is None or u == "%":
                continue
            qs.append((v, u, i))
            if u in _CONVERSIONS:
                qs.append((v * _CONVERSIONS[u][1], _CONVERSIONS[u][0], i))
        add_like, diff_like = self._asks("sum"), self._asks("difference")
        for x, (a, ua, i) in enumerate(qs):
            for y, (b, ub, j) in enumerate(qs):
                if i == j or ua != ub:
                    continue
                if add_like:
                    out.add((round(a + b, 2), ua))
                    if y > x:  # "what do these three cost together?"
                        out.update(
                            (round(a + b + c, 2), ua)
                            for z, (c, uc, k) in enumerate(qs)
                            if z > y and uc == ua and k not in (i, j)
                        )
                if diff_like:
                    out.add((round(abs(a - b), 2), ua))
        if self._asks("rate"):
            for rate, unit, per, _ in self._relevant(self.rates):
                out.update((round(a * rate, 2), unit) for a, ua, _ in qs if ua == per)
        if self._asks("percent"):
            percents = [v for v, u, _ in self._relevant([q for q in self.quantities if q[1] == "%"])]
            for a, ua, _ in qs:
                if ua != "$":
                    continue  # a discount or a fee is a share of a price
                for p in percents:
                    out.update((round(v, 2), ua) for v in (a * (1 - p / 100), a * (1 + p / 100), a * p / 100))
        for n in self.counts:
            out.update((round(a * n, 2), ua) for a, ua, _ in qs)
        return out

    @functools.cached_property
    def derived_dates(self) -> set[tuple[int, int, int]]:
        """Dates a stated period after or before a stated date (a purchase date plus a
        warranty or a return window), where the question asks for a date."""
        out = set()
        if not self._asks("date"):
            return out
        periods = [
            (int(v), u)
            for v, u, _ in self._relevant([q for q in self.quantities if q[1] in _PERIOD_UNITS])
            if v == int(v) and 0 < v <= 3650
        ]
        for start in self.full_dates:
            for n, unit in periods:
                for sign in (1, -1):
                    moved = _shift(start, sign * n, unit)
                    if moved is not None:
                        out.add((moved.year, moved.month, moved.day))
        return out

    def _derived(self, value: float, unit: str | None) -> bool:
        value = round(value, 2)
        return (value, unit) in self.derived_numbers or (
            unit is None and any(v == value for v, _ in self.derived_numbers)
        )

    def has_sequence(self, tokens: list[str]) -> bool:
        needle = " " + " ".join(tokens) + " "
        return any(needle in hay for hay in self.joined)

    def supports(self, claim: Claim) -> bool:
        if claim.kind == "date":
            parsed, _ = find_dates(claim.text)
            if not parsed:
                return False
            year, month, day = parsed[0][1]
            if any(
                m == month and (day is None or d == day) and (year is None or y in (None, year))
                for y, m, d in self.dates
            ):
                return True
            return year is not None and day is not None and (year, month, day) in self.derived_dates
        if claim.kind == "code":
            return _code_key(claim.text) in self.codes
        if claim.kind == "number":
            parsed, _ = find_numbers(claim.text)
            if not parsed:
                return False
            _, values, unit = parsed[0]
            return all(
                (v, unit) in self.numbers
                or (v, None) in self.numbers
                or (unit is None and any(n == v for n, _ in self.numbers))
                or self._derived(v, unit)
                for v in values
            )
        if claim.kind == "entity":
            words = tokens(claim.text)
            if self.has_sequence(words):
                return True
            # "Error E4 means..." when the source says "the display shows E4": a common word
            # (seen in lower case in the sources) capitalised at the start of the answer.
            first = claim.text.split()[0]
            return len(words) > 1 and first.lower() in self.lower_words and self.has_sequence(tokens(claim.text)[1:])
        if claim.kind == "term":
            return stem(claim.text) in self.stems
        raise ValueError(f"unknown claim kind {claim.kind!r}; expected one of {KINDS}")


_PERIOD_UNITS = frozenset({"day", "week", "month", "year"})
_CONVERSIONS = {"year": ("month", 12), "week": ("day", 7)}  # like periods add: 24 months + 2 years
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
# What a question says when it wants arithmetic; matched case-insensitively on the question.
_ASKS = {
    "sum": re.compile(
        r"\b(total|together|combined|altogether|in all|plus|sum|overall|add(?:ed|ing|s)?|"
        r"includ\w*|both|with (?:the )?(?:\w+ )?(?:shipping|delivery|care\+?|plan|fee))\b",
        re.I,
    ),
    "difference": re.compile(
        r"\b(difference|differ\w*|more|less|fewer|longer|shorter|cheaper|dearer|heavier|"
        r"lighter|louder|quieter|bigger|smaller|larger|than|save|saving|left|remain\w*|minus)\b",
        re.I,
    ),
    "rate": re.compile(r"\b(earn\w*|points?|per|each|every|rate|reward\w*|redeem\w*|worth)\b", re.I),
    "percent": re.compile(
        r"(%|\b(discount\w*|off|percent|fee|tax|student|sale|reduc\w*|sav\w*|restocking|"
        r"refund\w*)\b)",
        re.I,
    ),
    "date": re.compile(
        r"\b(until|last day|by when|when|date|expir\w*|deadline|end|ends|valid|due|"
        r"before|after|by)\b",
        re.I,
    ),
}
# "3 points for every $1", "$2 per kg", "Every 100 points can be redeemed for a $5 reward".
_RATE_FORWARD = re.compile(
    rf"(?P<n>(?:\$\s?)?{NUM}(?:[ \t]?(?:%|[A-Za-z]+))?)\s+(?:for\s+(?:every|each)|per|every|each|an?)"
    rf"\s+(?P<d>(?:\$\s?)?(?:{NUM}[ \t]?)?[A-Za-z]+|\$\s?{NUM})"
)
_RATE_BACKWARD = re.compile(
    rf"\b(?i:every)\s+(?P<d>(?:\$\s?)?{NUM}[ \t]?[A-Za-z]+)\b[^.;]{{0,40}}?\bfor\s+(?:an?\s+)?"
    rf"(?P<n>\$\s?{NUM}|{NUM}[ \t]?[A-Za-z]+)"
)
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def _content_stems(text: str) -> list[str]:
    return [stem(w) for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 2]


def _quantity(text: str) -> tuple[float, str] | None:
    """One value and its unit ("$1", "3 points", "kg" alone is one kg)."""
    parsed, _ = find_numbers(text)
    if parsed:
        _, values, unit = parsed[0]
        return (values[0], unit) if unit else None
    unit = unit_of(text.strip())
    return (1.0, unit) if unit else None


def _rates(text: str) -> list[tuple[float, str, str]]:
    """(value per one unit, unit, per unit) of every rate the text states."""
    out = []
    for pattern in (_RATE_FORWARD, _RATE_BACKWARD):
        for match in pattern.finditer(text):
            n, d = _quantity(match["n"]), _quantity(match["d"])
            if n and d and d[0] and n[1] != d[1] and "%" not in (n[1], d[1]):
                out.append((n[0] / d[0], n[1], d[1]))
    return out


def _counts(question: str) -> list[float]:
    """Item counts the question states ("two kettles", "3 of them"): multipliers of a price."""
    out = [float(_COUNT_WORDS[w]) for w in re.findall(r"[a-z]+", question.lower()) if w in _COUNT_WORDS]
    numbers, _ = find_numbers(CODE.sub(" ", find_dates(question)[1]))
    out += [
        v
        for _, values, unit in numbers
        for v in values
        if 1 < v <= 100 and v == int(v) and (unit is None or unit not in _MEASURE_UNITS)
    ]
    return out


_MEASURE_UNITS = frozenset(UNIT_ALIASES.values()) | _PERIOD_UNITS | {"minute", "hour", "point"}


def _shift(start: date, n: int, unit: str) -> date | None:
    try:
        if unit == "day":
            return start + timedelta(days=n)
        if unit == "week":
            return start + timedelta(weeks=n)
        months = start.year * 12 + start.month - 1 + (n if unit == "month" else 12 * n)
        return date(months // 12, months % 12 + 1, start.day)
    except (ValueError, OverflowError):
        return None  # 31 January + 1 month: no such day, no claim derived


def _code_key(code: str) -> str:
    return code.upper().replace("-", "")


def is_supported(claim: Claim, sources: list[str]) -> bool:
    """Whether the claim appears, after normalisation, in any of the sources."""
    return Evidence(sources).supports(claim)


# Words a refusal is made of, or politeness around it: they assert nothing about a product.
_REFUSAL_WORDS = frozenset(
    """
sorry apologies apologise apologize unfortunately afraid please thanks thank happy glad help assist
contact support team customer service check else anything details information info ask asking
question documents document passages passage context contexts sources source provided given here
i'm i've i'd i'll we're that's say says said mention mentions mentioned state states stated specify
specified contain contains find found answer tell know sure
""".split()
)


def _hedge_claims(answer: str) -> list[Claim]:
    """The claims of a reply outside its refusal phrases, its questions back to the customer
    ("Anything else?") and the words refusals are made of."""
    text = " ".join(answer.replace("\u2019", "'").split())
    for start, end in refusal_spans(text):
        text = blank(text, start, end)
    text = " ".join(s for s in re.split(r"(?<=[.!?])\s+", text) if not s.rstrip().endswith("?"))
    return [c for c in extract_claims(text) if not (c.kind == "term" and c.text in _REFUSAL_WORDS)]


def score_groundedness(question: str, contexts: list[str], answer: str, threshold: float = 0.8) -> dict:
    """Weighted share of the answer's claims found in the contexts or the question.

    A reply that declines ("The documents don't say.") is scored on its claims outside the
    refusal: it is `abstained` only if they reach the threshold (it restates the question or
    the passages), else "The documents do not say, but it costs $999." would count as an
    honest refusal in every metric; it is an unsupported answer."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    evidence = Evidence([question, *contexts], question=question)
    hedged = is_abstention(answer)
    claims = _hedge_claims(answer) if hedged else extract_claims(answer)
    unsupported = [c for c in claims if not evidence.supports(c)]
    total = sum(WEIGHTS[c.kind] for c in claims)
    missing = sum(WEIGHTS[c.kind] for c in unsupported)
    score = 1.0 if total == 0 else (total - missing) / total
    if hedged and score >= threshold:
        return {"score": 1.0, "label": "abstained", "unsupported_claims": [], "n_claims": 0}
    return {
        "score": round(score, 6),
        "label": "grounded" if score >= threshold else "unsupported",
        "unsupported_claims": [{"text": c.text, "kind": c.kind} for c in unsupported],
        "n_claims": len(claims),
    }


def abstains(question: str, contexts: Sequence[str], answer: str) -> bool:
    """Whether `answer` is an abstention: it declines, and what else it says is backed by
    `contexts` and `question` (see `score_groundedness`). The one test of abstention for every
    metric (evaluate, rag_eval, csat)."""
    return score_groundedness(question, list(contexts), answer)["label"] == "abstained"


def _context_texts(contexts: Any, where: str) -> list[str]:
    if not isinstance(contexts, list):
        raise ValueError(f"{where}: field 'contexts' must be a list of strings or of {{'text': ...}} objects")
    texts = []
    for i, context in enumerate(contexts):
        if isinstance(context, str):
            texts.append(context)
        elif isinstance(context, dict) and isinstance(context.get("text"), str):
            texts.append(context["text"])
        else:
            raise ValueError(f"{where}: contexts[{i}] must be a string or an object with a string 'text' field")
    return texts


def score_records(records: Iterable[dict], threshold: float = 0.8) -> list[dict]:
    """Score records with `question`, `contexts` and `answer`; a bad record is named by index and id."""
    results = []
    for index, record in enumerate(records):
        where = f"record {index}" + (f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else "")
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with question, contexts and answer")
        for field in ("question", "contexts", "answer"):
            if field not in record:
                raise ValueError(f"{where}: missing field {field!r} (need question, contexts, answer)")
        for field in ("question", "answer"):
            if not isinstance(record[field], str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
        contexts = _context_texts(record["contexts"], where)
        results.append(score_groundedness(record["question"], contexts, record["answer"], threshold))
    return results
