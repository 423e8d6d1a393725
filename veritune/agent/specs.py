"""The shop's tools as the model sees them: their JSON-schema specs (`TOOLS`), how a prompt
shows them (`tool_definitions`), and the check every call passes before it runs (`check_call`).

Short descriptions on purpose: every definition sits in every prompt. Every argument is checked
against its tool's schema, bounds included (ids, amounts, string lengths); the grammar of
constrained calls (`veritune.infer.constraints`) is compiled from the same schemas.
"""

from __future__ import annotations

from jsonschema import Draft202012Validator

MAX_ID = 2**31 - 1  # ids and amounts beyond these are refused by the schema, before SQLite sees them


MAX_AMOUNT = 1_000_000


MAX_SUMMARY_CHARS = 300


MAX_TEXT_CHARS = 500  # search queries; a calculator expression has its own 200


ORDER_ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}


# Short descriptions on purpose: every definition sits in every prompt, indented by 4.
TOOLS = [
    {
        "name": "get_order",
        "description": "Look up an order with its shipment and policy.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": ORDER_ID},
            "required": ["order_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": "list_orders",
        "description": "List a customer's orders.",
        "parameters": {
            "type": "object",
            "properties": {"customer_id": {"type": "string", "maxLength": 32}},
            "required": ["customer_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": "search_kb",
        "description": "Search the help centre.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": MAX_TEXT_CHARS}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    {
        "name": "calculate",
        "description": "Arithmetic on numbers and dates (2024-07-01 + 30).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": 200}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
    {
        "name": "open_ticket",
        "description": "Open a support ticket.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": ORDER_ID,
                "category": {"enum": ["delivery", "warranty"]},
                "summary": {"type": "string", "maxLength": MAX_SUMMARY_CHARS},
            },
            "required": ["order_id", "category", "summary"],
            "additionalProperties": False,
        },
    },
    {
        "name": "request_refund",
        "description": "Refund a delivered order.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": ORDER_ID,
                "amount": {"type": "number", "minimum": 0, "maximum": MAX_AMOUNT},
                "reason": {"enum": ["faulty", "unwanted"]},
            },
            "required": ["order_id", "amount", "reason"],
            "additionalProperties": False,
        },
    },
]


TOOL_NAMES = tuple(t["name"] for t in TOOLS)


def compact_definition(tool: dict) -> dict:
    """A tool as the prompt shows it when context is scarce: each parameter maps to its
    type (or its allowed values). The JSON Schema in `TOOLS` still validates every call."""

    def kind(schema: dict) -> str:
        return " or ".join(schema["enum"]) if "enum" in schema else schema["type"]

    return {
        "name": tool["name"],
        "description": tool["description"],
        "parameters": {k: kind(v) for k, v in tool["parameters"]["properties"].items()},
    }


def tool_definitions(style: str) -> list[dict]:
    """`json_schema`: the full JSON Schemas (for a real checkpoint); `compact`: see
    `compact_definition` (a fifth of the tokens on the tiny tokenizer)."""
    if style == "json_schema":
        return TOOLS
    if style == "compact":
        return [compact_definition(t) for t in TOOLS]
    raise ValueError(f"tool definition style must be 'json_schema' or 'compact', got {style!r}")


WRITE_TOOLS = ("open_ticket", "request_refund")


VALIDATORS = {t["name"]: Draft202012Validator(t["parameters"]) for t in TOOLS}


class ToolError(ValueError):
    """A tool call the toolbox refuses; the message is shown to the model."""


def check_call(name, parameters) -> None:
    """Raise ToolError unless `name` is a tool and `parameters` match its JSON schema."""
    if not isinstance(name, str) or name not in VALIDATORS:
        raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}")
    if not isinstance(parameters, dict):
        raise ToolError(f"parameters of {name} must be a JSON object")
    errors = sorted(VALIDATORS[name].iter_errors(parameters), key=lambda e: [str(p) for p in e.path])
    if errors:
        where = lambda e: ".".join(map(str, e.path)) or "parameters"  # noqa: E731
        raise ToolError(
            f"invalid arguments for {name}: " + "; ".join(f"{where(e)}: {_short(e.message)}" for e in errors)
        )
    for key, value in parameters.items():
        # JSON Schema cannot say "valid Unicode": a lone surrogate (json.loads lets "\ud800" through)
        # would fail only inside SQLite's encoder.
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ToolError(f"invalid arguments for {name}: {key} is not valid Unicode text") from None


def _short(message: str, limit: int = 200) -> str:
    """A schema error quotes the offending value: keep a huge one from filling the model's context."""
    return message if len(message) <= limit else message[:limit] + "..."
