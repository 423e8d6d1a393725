"""The claims of an answer: what it asserts that a source could support or not.

An answer is cut into claims (`extract_claims`): numbers with their unit, dates, codes,
capitalised entity names and the remaining content words ("terms"), each found by a pattern
here; `veritune.eval.groundedness` looks each one up in the sources, read with the same
patterns (`find_dates`, `find_numbers`, `CODE`, `tokens`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("number", "date", "code", "entity", "term")
WEIGHTS = {"number": 1.0, "date": 1.0, "code": 1.0, "entity": 1.0, "term": 0.25}


@dataclass(frozen=True)
class Claim:
    text: str
    kind: str  # one of KINDS


STOPWORDS = frozenset(
    """
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
""".split()
)

# Unit words that name the same unit; anything else is kept as its own stemmed word.
UNIT_ALIASES = {
    "$": "$",
    "dollar": "$",
    "dollars": "$",
    "usd": "$",
    "%": "%",
    "percent": "%",
    "per cent": "%",
    "pct": "%",
    "w": "w",
    "watt": "w",
    "watts": "w",
    "kw": "kw",
    "kilowatt": "kw",
    "kilowatts": "kw",
    "kg": "kg",
    "kilogram": "kg",
    "kilograms": "kg",
    "kilo": "kg",
    "kilos": "kg",
    "g": "g",
    "gram": "g",
    "grams": "g",
    "lb": "lb",
    "lbs": "lb",
    "pound": "lb",
    "pounds": "lb",
    "l": "l",
    "litre": "l",
    "litres": "l",
    "liter": "l",
    "liters": "l",
    "ml": "ml",
    "millilitre": "ml",
    "millilitres": "ml",
    "milliliter": "ml",
    "milliliters": "ml",
    "db": "db",
    "decibel": "db",
    "decibels": "db",
    "cm": "cm",
    "centimetre": "cm",
    "centimetres": "cm",
    "mm": "mm",
    "m": "m",
    "h": "hour",
    "hr": "hour",
    "hrs": "hour",
    "min": "minute",
    "mins": "minute",
}

_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
_MONTH_NUM = {m: i + 1 for i, m in enumerate(_MONTHS)} | {m[:3]: i + 1 for i, m in enumerate(_MONTHS)}
_MONTH_RE = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
    r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)

_DATE_PATTERNS = [  # each yields named groups y, m, d (some may be absent)
    re.compile(r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})\b"),
    re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m>{_MONTH_RE})\b(?:,?\s+(?P<y>\d{{4}})\b)?", re.I),
    re.compile(rf"\b(?P<m>{_MONTH_RE})\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<y>\d{{4}})\b)?", re.I),
    re.compile(rf"\b(?P<m>{_MONTH_RE})\s+(?P<y>\d{{4}})\b", re.I),
]
# Identifiers: letters then digits ("LK-4821", "K3", "E4", "X5Pro"); digits-only is a number.
_CODE_TOKEN = r"[A-Z]{1,4}-?\d+[A-Za-z0-9]*"
CODE = re.compile(rf"(?<![\w-])(?:{_CODE_TOKEN})(?![\w-])")
_CAP_WORD = r"[A-Z][a-z]+(?:-[A-Z]?[a-z]+)*"
_ENTITY = re.compile(rf"(?<![\w-])(?:{_CAP_WORD}|{_CODE_TOKEN})(?:[ \t]+(?:{_CAP_WORD}|{_CODE_TOKEN}))*(?![\w-])")
NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.,])(?P<cur>\$\s?)?(?P<a>{NUM})"
    rf"(?:\s*(?:-|\u2013|\u2014|to)\s*(?:\$\s?)?(?P<b>{NUM}))?"
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


def unit_of(word: str | None) -> str | None:
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


def blank(text: str, start: int, end: int) -> str:
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


def find_dates(text: str) -> tuple[list[tuple[str, tuple]], str]:
    """Date spans with their (year, month, day) key, and the text with them blanked out."""
    found = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            key = _date_key(match)
            if key is not None:
                found.append((match.group(0), key))
                text = blank(text, *match.span())
    return found, text


def find_numbers(text: str) -> tuple[list[tuple[str, tuple[float, ...], str | None]], str]:
    """Number spans (a range keeps both ends) with their unit, and the text with them blanked."""
    found = []
    for match in _NUMBER.finditer(text):
        values = (_to_float(match["a"]),) + ((_to_float(match["b"]),) if match["b"] else ())
        if match["cur"]:
            unit, end = "$", match.end("b") if match["b"] else match.end("a")
        else:
            unit = unit_of(match["unit"])
            end = match.end() if unit else (match.end("b") if match["b"] else match.end("a"))
        found.append((text[match.start() : end].strip(), values, unit, match.start(), end))
    for *_, start, end in found:
        text = blank(text, start, end)
    return [f[:3] for f in found], text


def tokens(text: str) -> list[str]:
    """Whole word and number tokens as claims are matched on: lower case, thousands separators
    dropped, a decimal kept with its number ("$1,299.50" -> "1299.50"); the agent's answer
    facts are matched on the same tokens (veritune.agent.tasks)."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return re.findall(r"[a-z0-9]+(?:\.\d+)?", text)


def extract_claims(answer: str) -> list[Claim]:
    """Cut an answer into checkable claims, most specific kinds first; duplicates dropped."""
    claims: list[Claim] = []
    dates, text = find_dates(answer)
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
        text = blank(text, start, match.end())

    for match in CODE.finditer(text):
        claims.append(Claim(match.group(0), "code"))
        text = blank(text, *match.span())

    numbers, text = find_numbers(text)
    claims += [Claim(span, "number") for span, _, _ in numbers]

    for match in _WORD.finditer(text):
        word = match.group(0).lower().replace("\u2019", "'")
        if word not in STOPWORDS and len(word) > 1:
            claims.append(Claim(word, "term"))
    return list(dict.fromkeys(claims))
