"""params.yaml read into the checked dataclasses of `veritune.core.params`, before any model or
GPU is touched.

    p = load_params("train")                    # a TrainParams, from ./params.yaml

pydantic checks every field's type strictly, unknown and missing keys; then each section's
`problems()` checks ranges and the rules between its fields, also when a type elsewhere is
wrong; then the values that must agree across sections (`LINKS`) are compared. Every problem
found is listed in one `ParamsError`, each saying how to fix it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from veritune.core.params import (
    AgentDbParams,
    AgentEvalParams,
    BaseParams,
    BuildSftParams,
    CsatParams,
    EvaluateParams,
    ExportParams,
    GateParams,
    IndexParams,
    RagEvalParams,
    ServeParams,
    SplitParams,
    StressParams,
    TrainParams,
    ValidateParams,
)

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml does not describe a valid run; the message lists every problem."""


STAGE_PARAMS: dict[str, type] = {
    "validate": ValidateParams,
    "split": SplitParams,
    "index": IndexParams,
    "build_sft": BuildSftParams,
    "base": BaseParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "csat": CsatParams,
    "gate": GateParams,
    "rag_eval": RagEvalParams,
    "serve": ServeParams,
    "stress": StressParams,
    "agent_db": AgentDbParams,
    "agent_eval": AgentEvalParams,
}


@dataclass(frozen=True)
class Link:
    """Two values in different sections that must agree: `left op right`."""

    left: str  # "section.key"
    op: str  # "==" or "<="
    right: str
    why: str


# Checked whenever either section is loaded, from the same file: a link only ever stops a run,
# it never changes a value, so a stage need not declare the other section's params.
LINKS = (
    Link(
        "serve.retrieval_k",
        "==",
        "build_sft.context_chunks",
        "the server shows each answer as many passages as the model was trained with",
    ),
    Link(
        "build_sft.agent_search_k",
        "<=",
        "serve.retrieval_k",
        "the served agent's search_kb takes its passages from one server search of serve.retrieval_k",
    ),
    Link(
        "stress.max_tokens",
        "<=",
        "serve.max_new_tokens",
        "the server refuses a request whose max_tokens is over serve.max_new_tokens",
    ),
)
_OPS = {"==": (operator.eq, "equal"), "<=": (operator.le, "be at most")}


# --------------------------------------------------------------------------- types (pydantic)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _class_at(cls: type, loc: tuple) -> type | None:
    """The dataclass a pydantic error location points into (None: not a section's field)."""
    for part in loc:
        if isinstance(part, int):
            continue
        hint = _fields(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
        if not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls


def _describe(error: dict, section: str, cls: type) -> str:
    """One pydantic error in params.yaml's own words."""
    loc = error["loc"]
    where = section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    value = error.get("input")
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _class_at(cls, loc[:-1])
        known = ", ".join(f.name for f in dataclasses.fields(owner)) if owner else "none"
        return f"{where} is not a known setting (known: {known})"
    if kind == "missing":
        return f"{where} is required: params.yaml sets every value"
    if kind == "literal_error":
        return f"{where} must be one of {error['ctx']['expected']}, got {value!r}"
    expected = {
        "int_type": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "tuple_type": "a list",
        "dataclass_type": "a mapping",
    }.get(kind)
    if expected:
        return f"{where} must be {expected}, got {value!r}"
    return f"{where}: {error['msg']}"


# --------------------------------------------------------------------------- ranges (problems())


def _unchecked(cls: type, raw: Any) -> Any:
    """`raw` as an instance of `cls` without any check, for the range checks of a section whose
    types did not all validate (None when a field is missing)."""
    if not isinstance(raw, dict):
        return raw
    kwargs = {}
    for name, hint in _fields(cls).items():
        if name not in raw:
            return None
        value = raw[name]
        if dataclasses.is_dataclass(hint):
            value = _unchecked(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            inner = typing.get_args(hint)[0]
            value = tuple(_unchecked(inner, v) if dataclasses.is_dataclass(inner) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _range_problems(obj: Any) -> list[str]:
    """`problems()` of `obj` and of every section inside it."""
    if not dataclasses.is_dataclass(obj):
        return []
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for inner in value if isinstance(value, tuple) else (value,):
            out += _range_problems(inner)
    try:
        out += obj.problems()
    except (TypeError, AttributeError):
        pass  # a wrong type is already reported; its range check cannot run
    return out


# --------------------------------------------------------------------------- links


def _value(raw_file: dict, dotted: str) -> Any:
    node: Any = raw_file
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def link_problems(raw_file: dict, section: str) -> list[str]:
    """The `LINKS` touching `section` that params.yaml breaks (a link whose other section the
    file lacks is not checked)."""
    out = []
    for link in LINKS:
        if section not in (link.left.split(".")[0], link.right.split(".")[0]):
            continue
        left, right = _value(raw_file, link.left), _value(raw_file, link.right)
        if left is None or right is None:
            continue
        check, words = _OPS[link.op]
        try:
            ok = check(left, right)
        except TypeError:
            continue  # a wrong type is reported by its own section
        if not ok:
            out.append(
                f"{link.left} ({left!r}) must {words} {link.right} ({right!r}): {link.why}; change them together"
            )
    return out


# --------------------------------------------------------------------------- loading


def parse_params(section: str, raw: dict[str, Any] | None, raw_file: dict | None = None) -> Any:
    """Build and check the dataclass for one `params.yaml` section (with `raw_file`, the whole
    file, also the links between sections)."""
    if section not in STAGE_PARAMS:
        raise ParamsError(f"no params section named {section!r} (known: {', '.join(STAGE_PARAMS)})")
    cls = STAGE_PARAMS[section]
    raw = {} if raw is None else raw
    problems: list[str] = []
    try:
        # JSON mode: YAML's lists are the sections' tuples and its mappings their nested sections.
        params = _adapter(cls).validate_json(json.dumps(raw, default=str))
    except ValidationError as e:
        problems += [_describe(err, section, cls) for err in e.errors()]
        params = _unchecked(cls, raw) if isinstance(raw, dict) else None
    problems += _range_problems(params)
    if raw_file is not None:
        problems += link_problems(raw_file, section)
    if problems:
        raise ParamsError("params.yaml has problems:\n  - " + "\n  - ".join(problems))
    return params


def load_params(section: str, path: str | Path = PARAMS_FILE) -> Any:
    """Read `path` and return the checked dataclass of its `section`."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run stages from the project root")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_params(section, raw.get(section), raw)


def as_dict(params: Any) -> dict[str, Any]:
    """The effective config as plain data, for saving beside an artifact."""
    return dataclasses.asdict(params)
