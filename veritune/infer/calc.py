"""Calculator annotations in replies: the model writes the sum, the calculator does it.

A small model copies numbers from its passages well and adds them badly (the default's
multi-hop answers: "$109" for a total of $817). So an answer that needs arithmetic is written
as the calculation over the quoted figures, between `<calc>` and `</calc>`, and `resolve`
replaces each such span with its result before anyone reads the reply:

    resolve("<calc>$299 + $219 + $299</calc>")           # "$817"
    resolve("<calc>5.2 kg + 6.9 kg</calc>")              # "12.1 kg"
    resolve("<calc>$219 * (100% - 15%)</calc>")          # "$186.15"
    resolve("<calc>2025-07-12 + 14 days</calc>")         # "2025-07-26"
    resolve("<calc>2026-02-24 + 36 months</calc>")       # "2029-02-24"

An expression is `calculate`'s language (numbers, + - * /, parentheses;
the agent's calculator tool) plus what answers carry: `$` amounts, `N%` (N / 100), a unit
word after a number (the result takes the last one: `209 * 3 points` is "627 points") and
date plus or minus days, months or years. A span that does not evaluate stays in the reply
as its expression, never as a made-up number (`finish` also strips a span left open at the
token limit). Every consumer of generated replies resolves through this module (evaluate,
rag_eval, csat and the judge through `veritune.infer.decode.generate`; the server's chat
completions, streamed or not, built-in or upstream; the agent's answers); only the raw
`/v1/completions` endpoint returns text as generated. build_sft writes the spans from the
question records' `calculation` field.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

OPEN, CLOSE = "<calc>", "</calc>"
# The innermost span: a literal "<calc>" earlier in the text does not swallow a real one.
_SPAN = re.compile(re.escape(OPEN) + r"((?:(?!" + re.escape(OPEN) + r").)*?)" + re.escape(CLOSE), re.DOTALL)
_DATE_SHIFT = re.compile(
    r"\s*(\d{4}-\d{2}-\d{2})\s*([+-])\s*(\d+)\s*(day|days|week|weeks|month|months|year|years)\s*", re.IGNORECASE
)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_WORD = re.compile(r"[A-Za-z]+")
MAX_EXPRESSION_CHARS = 200


class CalcError(ValueError):
    """An expression the calculator cannot evaluate (the reason is the message)."""


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")


def calculate(expression: str) -> int | float | str:
    """+ - * / and parentheses over numbers and ISO dates: date + days -> date,
    date - date -> days. Parsed with `ast`, never evaluated as Python."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    dates: list[date] = []

    def stash(m: re.Match) -> str:
        try:
            dates.append(date.fromisoformat(m.group(0)))
        except ValueError:
            raise CalcError(f"{m.group(0)} is not a valid date (YYYY-MM-DD)") from None
        return f"_d{len(dates) - 1}"

    try:
        tree = ast.parse(_ISO_DATE.sub(stash, expression.strip()), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        raise CalcError(f"cannot parse {expression!r}; use numbers, dates (YYYY-MM-DD), + - * / and ( )") from None

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and re.fullmatch(r"_d\d+", node.id) and int(node.id[2:]) < len(dates):
            return dates[int(node.id[2:])]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(a, date) or isinstance(b, date):
                if isinstance(node.op, ast.Add) and isinstance(a, date) and isinstance(b, int):
                    return a + timedelta(days=b)
                if isinstance(node.op, ast.Sub) and isinstance(a, date) and isinstance(b, int):
                    return a - timedelta(days=b)
                if isinstance(node.op, ast.Sub) and isinstance(a, date) and isinstance(b, date):
                    return (a - b).days
                raise CalcError("dates support date + days, date - days and date - date only")
            if isinstance(node.op, ast.Div) and b == 0:
                raise CalcError("division by zero")
            return _OPS[type(node.op)](a, b)
        raise CalcError(f"unsupported element in {expression!r}; use numbers, dates, + - * / and ( )")

    try:
        value = ev(tree.body)
    except (OverflowError, RecursionError):  # a date past year 9999, a quotient too large for a float
        raise CalcError(f"{expression!r} is out of range; use smaller numbers") from None
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError(f"{expression!r} is out of range; use smaller numbers")
    return round(value, 6) if isinstance(value, float) else value


def shift_date(start: date, n: int, unit: str) -> date:
    """`start` moved by `n` days, weeks, months or years (a month keeps the day of the month;
    a day the target month lacks, 31 January + 1 month, is an error, not a guess)."""
    unit = unit.lower().rstrip("s")
    if unit == "day":
        return start + timedelta(days=n)
    if unit == "week":
        return start + timedelta(weeks=n)
    months = start.year * 12 + start.month - 1 + (n if unit == "month" else 12 * n)
    try:
        return date(months // 12, months % 12 + 1, start.day)
    except ValueError:
        raise CalcError(f"{start.isoformat()} + {n} {unit}s: that day does not exist") from None


def evaluate(expression: str) -> str:
    """The result of one calculation, formatted as an answer: "$83.95", "12.1 kg", "2025-07-26"."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    inner = expression.strip()
    while inner.startswith("(") and inner.endswith(")") and _balanced(inner[1:-1]):
        inner = inner[1:-1].strip()
    shift = _DATE_SHIFT.fullmatch(inner)
    if shift:
        start, sign, n, unit = shift.groups()
        try:
            day = date.fromisoformat(start)
        except ValueError:
            raise CalcError(f"{start} is not a valid date") from None
        return shift_date(day, int(n) if sign == "+" else -int(n), unit).isoformat()
    money = "$" in expression
    units = [w for w in _WORD.findall(expression)]
    if _ISO_DATE.search(expression) and units:
        # Only "date +/- N unit" (above) moves a date by months or years; anything else with a
        # date and a unit word would silently count the unit as days.
        raise CalcError(f"{expression!r}: write a date shift as one 'YYYY-MM-DD + N days|weeks|months|years'")
    if len({w.lower().removesuffix("s") for w in units}) > 1:
        raise CalcError(f"{expression!r} mixes units ({', '.join(dict.fromkeys(units))}); convert to one first")
    bare = _WORD.sub(" ", _PERCENT.sub(r"(\1 / 100)", expression.replace("$", "").replace(",", "")))
    value = calculate(bare)
    if isinstance(value, str):  # a date: date + days (calculate's own date arithmetic)
        return value
    if units:
        return f"{_number(value)} {units[-1]}"
    if money:
        cents = Decimal(str(value)).quantize(Decimal("0.01"), ROUND_HALF_UP)
        sign, cents = ("-" if cents < 0 else ""), abs(cents)
        return f"{sign}${int(cents)}" if cents == cents.to_integral() else f"{sign}${cents}"
    return _number(value)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _number(value: int | float) -> str:
    """Up to two decimals, no exponent, no trailing zeros: 12.1, 0.9, 1234567.89."""
    text = f"{Decimal(str(value)).quantize(Decimal('0.01'), ROUND_HALF_UP):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def resolve(text: str) -> str:
    """`text` with every complete calculation span replaced by its result; a span that does
    not evaluate is replaced by its bare expression."""
    if OPEN not in text:
        return text

    def result(m: re.Match) -> str:
        try:
            return evaluate(m.group(1))
        except CalcError:
            return m.group(1).strip()

    return _SPAN.sub(result, text)


def finish(text: str) -> str:
    """A finished reply: spans resolved, and a span left open (the reply hit its token limit
    or a stop sequence inside it) replaced by its bare expression, never shown as markup."""
    resolved = resolve(text)
    cut = resolved.find(OPEN)
    return resolved if cut < 0 else resolved[:cut] + resolved[cut + len(OPEN) :].strip()


def stable_prefix(text: str) -> tuple[str, int]:
    """For streaming: `text` resolved, and how much of it can be sent now. A span still open
    (or a partial `<calc>` at the very end) is held back until it closes."""
    resolved = resolve(text)
    cut = resolved.find(OPEN)
    if cut < 0:
        for n in range(min(len(OPEN) - 1, len(resolved)), 0, -1):
            if resolved.endswith(OPEN[:n]):
                cut = len(resolved) - n
                break
    return resolved, len(resolved) if cut < 0 else cut
