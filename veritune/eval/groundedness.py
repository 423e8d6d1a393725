"""Groundedness of a RAG answer: which of its claims the retrieved contexts support.

Deterministic and model-free, so it can score any RAG output (ours or another system's):

    from veritune.eval.groundedness import score_groundedness
    score_groundedness(question, contexts, answer)
    # {"score": 0.5, "label": "unsupported", "unsupported_claims": [...], "n_claims": 2}

An answer is cut into claims -- numbers with their unit, dates, codes, capitalised entity
names and the remaining content words ("terms") -- and each claim is looked up in the
contexts and the question after normalisation. The score is the weighted share of supported
claims; specific facts (numbers, dates, codes, entities) weigh 1.0 and terms 0.25, because a
paraphrase changes words while a hallucination usually changes a fact.

From the shell: `veritune score answers.jsonl` (see `veritune/cli.py`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Iterable, Sequence

from veritune.eval.scoring import is_abstention, refusal_spans

KINDS = ("number", "date", "code", "entity", "term")
WEIGHTS = {"number": 1.0, "date": 1.0, "code": 1.0, "entity": 1.0, "term": 0.25}


@dataclass(frozen=True)
class Claim:
    text: str
    kind: str  # one of KINDS


STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
don't down during each either few for from further had hadn't has hasn't have haven't having he
her here hers herself him himself his how i if in into is isn't it it's its itself just let's me
more most much must my myself neither no nor not now of off on once only or other our ours
ourselves out over own per same she should shouldn't so some such than that that's the their
theirs them themselves then there there's these they this those through to too under until up
upon us very was wasn't we were weren't what what's when where which while who whom whose why will
with won't would wouldn't yes you your yours yourself yourselves
according answer approximately around roughly exactly total together
""".split())

# Unit words that name the same unit; anything else is kept as its own stemmed word.
UNIT_ALIASES = {
    "$": "$", "dollar": "$", "dollars": "$", "usd": "$",
    "%": "%", "percent": "%", "per cent": "%", "pct": "%",
    "w": "w", "watt": "w", "watts": "w", "kw": "kw", "kilowatt": "kw", "kilowatts": "kw",
    "kg": "kg", "kilogram": "kg", "kilograms": "kg", "kilo": "kg", "kilos": "kg",
    "g": "g", "gram": "g", "grams": "g", "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "l": "l", "litre": "l", "litres": "l", "liter": "l", "liters": "l",
    "ml": "ml", "millilitre": "ml", "millilitres": "ml", "milliliter": "ml", "milliliters": "ml",
    "db": "db", "decibel": "db", "decibels": "db",
    "cm": "cm", "centimetre": "cm", "centimetres": "cm", "mm": "mm", "m": "m",
    "h": "hour", "hr": "hour", "hrs": "hour", "min": "minute", "mins": "minute",
}

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december"]
_MONTH_NUM = {m: i + 1 for i, m in enumerate(_MONTHS)} | {m[:3]: i + 1 for i, m in enumerate(_MONTHS)}
_MONTH_RE = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"

_DATE_PATTERNS = [  # each yields named groups y, m, d (some may be absent)
    re.compile(r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})\b"),
    re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m>{_MONTH_RE})\b(?:,?\s+(?P<y>\d{{4}})\b)?", re.I),
    re.compile(rf"\b(?P<m>{_MONTH_RE})\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<y>\d{{4}})\b)?", re.I),
    re.compile(rf"\b(?P<m>{_MONTH_RE})\s+(?P<y>\d{{4}})\b", re.I),
]
# Identifiers: letters then digits ("LK-4821", "K3", "E4", "X5Pro"); digits-only is a number.
_CODE_TOKEN = r"[A-Z]{1,4}-?\d+[A-Za-z0-9]*"
_CODE = re.compile(rf"(?<![\w-])(?:{_CODE_TOKEN})(?![\w-])")
_CAP_WORD = r"[A-Z][a-z]+(?:-[A-Z]?[a-z]+)*"
_ENTITY = re.compile(rf"(?<![\w-])(?:{_CAP_WORD}|{_CODE_TOKEN})(?:[ \t]+(?:{_CAP_WORD}|{_CODE_TOKEN}))*(?![\w-])")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.,])(?P<cur>\$\s?)?(?P<a>{_NUM})"
    rf"(?:\s*(?:-|\u2013|\u2014|to)\s*(?:\$\s?)?(?P<b>{_NUM}))?"
    rf"(?:[ \t]?(?P<unit>%|per cent\b|(?:business|working|calendar) days\b|[A-Za-z]+\b))?"
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")


def stem(word: str) -> str:
    """Light suffix stripping: plural s/es, -ing, -ed; a final e is dropped so use/used match."""
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 5 and w.endswith("ing"):
        w = w[:-3]
    elif len(w) > 4 and w.endswith("ed"):
        w = w[:-2]
    elif len(w) > 4 and w.endswith("es") and w[-3] in "sxz" or w.endswith(("ches", "shes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def _norm_unit(word: str | None) -> str | None:
    if not word:
        return None
    w = word.lower()
    if w in UNIT_ALIASES:
        return UNIT_ALIASES[w]
    if w in STOPWORDS:
        return None
    return stem(w)


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def _mask(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _date_key(match: re.Match) -> tuple[int | None, int, int | None] | None:
    g = match.groupdict()
    m = g.get("m")
    month = int(m) if m.isdigit() else _MONTH_NUM.get(m.lower()[:3])
    day = int(g["d"]) if g.get("d") else None
    year = int(g["y"]) if g.get("y") else None
    if not month or not 1 <= month <= 12 or (day is not None and not 1 <= day <= 31):
        return None
    return year, month, day


def _dates(text: str) -> tuple[list[tuple[str, tuple]], str]:
    """Date spans with their (year, month, day) key, and the text with them blanked out."""
    found = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            key = _date_key(match)
            if key is not None:
                found.append((match.group(0), key))
                text = _mask(text, *match.span())
    return found, text


def _numbers(text: str) -> tuple[list[tuple[str, tuple[float, ...], str | None]], str]:
    """Number spans (a range keeps both ends) with their unit, and the text with them blanked."""
    found = []
    for match in _NUMBER.finditer(text):
        values = (_to_float(match["a"]),) + ((_to_float(match["b"]),) if match["b"] else ())
        if match["cur"]:
            unit, end = "$", match.end("b") if match["b"] else match.end("a")
        else:
            unit = _norm_unit(match["unit"])
            end = match.end() if unit else (match.end("b") if match["b"] else match.end("a"))
        found.append((text[match.start():end].strip(), values, unit, match.start(), end))
    for *_, start, end in found:
        text = _mask(text, start, end)
    return [f[:3] for f in found], text


def tokens(text: str) -> list[str]:
    """Whole word and number tokens as claims are matched on: lower case, thousands separators
    dropped, a decimal kept with its number ("$1,299.50" -> "1299.50"); the agent's answer
    facts are matched on the same tokens (veritune.agent.tasks)."""
    return _tokens(text)


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return re.findall(r"[a-z0-9]+(?:\.\d+)?", text)


def extract_claims(answer: str) -> list[Claim]:
    """Cut an answer into checkable claims, most specific kinds first; duplicates dropped."""
    claims: list[Claim] = []
    dates, text = _dates(answer)
    claims += [Claim(span, "date") for span, _ in dates]

    for match in _ENTITY.finditer(text):
        words = match.group(0).split()
        start = match.start()
        while words and words[0].lower() in STOPWORDS:  # "The Aurora K3 Kettle"
            start = text.find(words[1], start + len(words[0])) if len(words) > 1 else match.end()
            words = words[1:]
        if not words or not any(re.fullmatch(_CAP_WORD, w) for w in words):
            continue  # codes alone are claimed below
        if len(words) == 1 and _SENTENCE_START.search(text[:start]):
            continue  # a capitalised first word is just a word
        claims.append(Claim(" ".join(words), "entity"))
        text = _mask(text, start, match.end())

    for match in _CODE.finditer(text):
        claims.append(Claim(match.group(0), "code"))
        text = _mask(text, *match.span())

    numbers, text = _numbers(text)
    claims += [Claim(span, "number") for span, _, _ in numbers]

    for match in _WORD.finditer(text):
        word = match.group(0).lower().replace("\u2019", "'")
        if word not in STOPWORDS and len(word) > 1:
            claims.append(Claim(word, "term"))
    return list(dict.fromkeys(claims))


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
            tokens = _tokens(source)
            self.joined.append(" " + " ".join(tokens) + " ")
            self.stems.update(stem(t) for t in tokens)
            self.lower_words.update(w for w in re.findall(r"\b[a-z][a-z]*\b", source))

    def _add_sentence(self, sentence: str, context: frozenset[str]) -> None:
        """Sentence by sentence, so that a rate is never read across a sentence boundary."""
        dates, rest = _dates(sentence)
        self.dates.update(key for _, key in dates)
        # Dates also count as plain numbers ("2024" said on its own).
        self.numbers.update((float(v), None) for _, key in dates for v in key if v is not None)
        self.codes.update(_code_key(m.group(0)) for m in _CODE.finditer(rest))
        rest = _CODE.sub(" ", rest)
        numbers, _ = _numbers(rest)
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
                        out.update((round(a + b + c, 2), ua) for z, (c, uc, k) in enumerate(qs)
                                   if z > y and uc == ua and k not in (i, j))
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
        periods = [(int(v), u) for v, u, _ in self._relevant([q for q in self.quantities if q[1] in _PERIOD_UNITS])
                   if v == int(v) and 0 < v <= 3650]
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
            unit is None and any(v == value for v, _ in self.derived_numbers))

    def has_sequence(self, tokens: list[str]) -> bool:
        needle = " " + " ".join(tokens) + " "
        return any(needle in hay for hay in self.joined)

    def supports(self, claim: Claim) -> bool:
        if claim.kind == "date":
            parsed, _ = _dates(claim.text)
            if not parsed:
                return False
            year, month, day = parsed[0][1]
            if any(m == month and (day is None or d == day) and (year is None or y in (None, year))
                   for y, m, d in self.dates):
                return True
            return year is not None and day is not None and (year, month, day) in self.derived_dates
        if claim.kind == "code":
            return _code_key(claim.text) in self.codes
        if claim.kind == "number":
            parsed, _ = _numbers(claim.text)
            if not parsed:
                return False
            _, values, unit = parsed[0]
            return all((v, unit) in self.numbers or (v, None) in self.numbers
                       or (unit is None and any(n == v for n, _ in self.numbers))
                       or self._derived(v, unit) for v in values)
        if claim.kind == "entity":
            tokens = _tokens(claim.text)
            if self.has_sequence(tokens):
                return True
            # "Error E4 means..." when the source says "the display shows E4": a common word
            # (seen in lower case in the sources) capitalised at the start of the answer.
            first = claim.text.split()[0]
            return len(tokens) > 1 and first.lower() in self.lower_words and self.has_sequence(_tokens(claim.text)[1:])
        if claim.kind == "term":
            return stem(claim.text) in self.stems
        raise ValueError(f"unknown claim kind {claim.kind!r}; expected one of {KINDS}")


_PERIOD_UNITS = frozenset({"day", "week", "month", "year"})
_CONVERSIONS = {"year": ("month", 12), "week": ("day", 7)}  # like periods add: 24 months + 2 years
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
# What a question says when it wants arithmetic; matched case-insensitively on the question.
_ASKS = {
    "sum": re.compile(r"\b(total|together|combined|altogether|in all|plus|sum|overall|add(?:ed|ing|s)?|"
                      r"includ\w*|both|with (?:the )?(?:\w+ )?(?:shipping|delivery|care\+?|plan|fee))\b", re.I),
    "difference": re.compile(r"\b(difference|differ\w*|more|less|fewer|longer|shorter|cheaper|dearer|heavier|"
                             r"lighter|louder|quieter|bigger|smaller|larger|than|save|saving|left|remain\w*|minus)\b",
                             re.I),
    "rate": re.compile(r"\b(earn\w*|points?|per|each|every|rate|reward\w*|redeem\w*|worth)\b", re.I),
    "percent": re.compile(r"(%|\b(discount\w*|off|percent|fee|tax|student|sale|reduc\w*|sav\w*|restocking|"
                          r"refund\w*)\b)", re.I),
    "date": re.compile(r"\b(until|last day|by when|when|date|expir\w*|deadline|end|ends|valid|due|"
                       r"before|after|by)\b", re.I),
}
# "3 points for every $1", "$2 per kg", "Every 100 points can be redeemed for a $5 reward".
_RATE_FORWARD = re.compile(rf"(?P<n>(?:\$\s?)?{_NUM}(?:[ \t]?(?:%|[A-Za-z]+))?)\s+(?:for\s+(?:every|each)|per|every|each|an?)"
                           rf"\s+(?P<d>(?:\$\s?)?(?:{_NUM}[ \t]?)?[A-Za-z]+|\$\s?{_NUM})")
_RATE_BACKWARD = re.compile(rf"\b(?i:every)\s+(?P<d>(?:\$\s?)?{_NUM}[ \t]?[A-Za-z]+)\b[^.;]{{0,40}}?\bfor\s+(?:an?\s+)?"
                            rf"(?P<n>\$\s?{_NUM}|{_NUM}[ \t]?[A-Za-z]+)")
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def _content_stems(text: str) -> list[str]:
    return [stem(w) for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 2]


def _quantity(text: str) -> tuple[float, str] | None:
    """One value and its unit ("$1", "3 points", "kg" alone is one kg)."""
    parsed, _ = _numbers(text)
    if parsed:
        _, values, unit = parsed[0]
        return (values[0], unit) if unit else None
    unit = _norm_unit(text.strip())
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
    numbers, _ = _numbers(_CODE.sub(" ", _dates(question)[1]))
    out += [v for _, values, unit in numbers for v in values
            if 1 < v <= 100 and v == int(v) and (unit is None or unit not in _MEASURE_UNITS)]
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
_REFUSAL_WORDS = frozenset("""
sorry apologies apologise apologize unfortunately afraid please thanks thank happy glad help assist
contact support team customer service check else anything details information info ask asking
question documents document passages passage context contexts sources source provided given here
i'm i've i'd i'll we're that's say says said mention mentions mentioned state states stated specify
specified contain contains find found answer tell know sure
""".split())


def _hedge_claims(answer: str) -> list[Claim]:
    """The claims of a reply outside its refusal phrases, its questions back to the customer
    ("Anything else?") and the words refusals are made of."""
    text = " ".join(answer.replace("\u2019", "'").split())
    for start, end in refusal_spans(text):
        text = _mask(text, start, end)
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
    `contexts` and `question` (see `score_groundedness`). The one test of abstention for every metric (evaluate, rag_eval, csat)."""
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
