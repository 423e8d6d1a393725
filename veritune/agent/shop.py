"""The shop's business database: its tables, the checks of the raw records, and the copies
episodes work on.

`agent_db` builds `SHOP_DB` from data/raw/business/ (`build_database`); every episode, in
`build_sft`, `agent_eval` and the server's agent mode, works on its own copy
(`episode_database`), so writes never reach the original; `db_state` is what an episode's
outcome is compared by.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from datetime import date
from pathlib import Path

SHOP_DB = Path("data/agent/business.sqlite")  # what `agent_db` builds and the agent stages read

SCHEMA = """
CREATE TABLE customers (customer_id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE products (sku TEXT PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
    price INTEGER NOT NULL, warranty_months INTEGER NOT NULL, return_window_days INTEGER NOT NULL);
CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers,
    sku TEXT NOT NULL REFERENCES products, quantity INTEGER NOT NULL, order_date TEXT NOT NULL,
    status TEXT NOT NULL);
CREATE TABLE shipments (order_id INTEGER PRIMARY KEY REFERENCES orders, carrier TEXT NOT NULL,
    tracking TEXT NOT NULL, shipped_date TEXT NOT NULL, delivered_date TEXT);
CREATE TABLE tickets (ticket_id TEXT PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders,
    category TEXT NOT NULL, status TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE refunds (refund_id TEXT PRIMARY KEY, order_id INTEGER NOT NULL UNIQUE REFERENCES orders,
    amount REAL NOT NULL, reason TEXT NOT NULL);
"""
# table -> (key column, {column: python type}, {column: referenced table}); refunds start empty.
TABLES = {
    "customers": ("customer_id", {"customer_id": str, "name": str}, {}),
    "products": (
        "sku",
        {"sku": str, "name": str, "category": str, "price": int, "warranty_months": int, "return_window_days": int},
        {},
    ),
    "orders": (
        "order_id",
        {"order_id": int, "customer_id": str, "sku": str, "quantity": int, "order_date": str, "status": str},
        {"customer_id": "customers", "sku": "products"},
    ),
    "shipments": (
        "order_id",
        {"order_id": int, "carrier": str, "tracking": str, "shipped_date": str, "delivered_date": (str, type(None))},
        {"order_id": "orders"},
    ),
    "tickets": (
        "ticket_id",
        {"ticket_id": str, "order_id": int, "category": str, "status": str, "summary": str},
        {"order_id": "orders"},
    ),
}
ORDER_STATUSES = ("processing", "shipped", "delivered")
DATE_COLUMNS = ("order_date", "shipped_date", "delivered_date")


class BusinessDataError(ValueError):
    """A raw business record is malformed; the message names the table, the id and the field."""


def validate_business(tables: dict[str, list[dict]]) -> list[str]:
    """Every problem of the raw tables: fields and types, unique ids, foreign keys, dates."""
    problems = []
    keys: dict[str, set] = {}
    for table, (key, columns, _) in TABLES.items():
        seen = set()
        for i, row in enumerate(tables.get(table, [])):
            rid = row.get(key, f"line {i + 1}")
            for column, kind in columns.items():
                if column not in row:
                    problems.append(f"{table} {rid}: field {column} is missing")
                elif isinstance(row[column], bool) or not isinstance(row[column], kind):
                    problems.append(f"{table} {rid}: field {column} has the wrong type ({row[column]!r})")
            for column in set(row) - set(columns):
                problems.append(f"{table} {rid}: field {column} is not a known column")
            if rid in seen:
                problems.append(f"{table} {rid}: duplicate {key}")
            seen.add(rid)
            for column in DATE_COLUMNS:
                if isinstance(row.get(column), str):
                    try:
                        date.fromisoformat(row[column])
                    except ValueError:
                        problems.append(f"{table} {rid}: field {column} is not an ISO date ({row[column]!r})")
        keys[table] = seen
    for table, (key, _, references) in TABLES.items():
        for row in tables.get(table, []):
            for column, target in references.items():
                if column in row and row[column] not in keys[target]:
                    problems.append(
                        f"{table} {row.get(key)}: field {column} = {row[column]!r} is not a known "
                        f"{TABLES[target][0]} in {target}"
                    )
    for row in tables.get("orders", []):
        if row.get("status") not in ORDER_STATUSES:
            problems.append(f"orders {row.get('order_id')}: field status must be one of {ORDER_STATUSES}")
    return problems


def build_database(tables: dict[str, list[dict]], path: str | Path) -> None:
    """Write the validated tables to a new SQLite file at `path`."""
    problems = validate_business(tables)
    if problems:
        raise BusinessDataError("business data has problems:\n  - " + "\n  - ".join(problems[:50]))
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        for table, (_, columns, _) in TABLES.items():
            names = list(columns)
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [tuple(row[c] for c in names) for row in tables[table]],
            )
        conn.commit()
        violations = conn.execute("PRAGMA foreign_key_check").fetchall()
        if violations:
            raise BusinessDataError(f"foreign keys do not resolve: {violations[:5]}")
    finally:
        conn.close()


def episode_database(source: str | Path, directory: str | Path, name: str) -> Path:
    """A private copy of the shop database for one episode: writes never reach `source`."""
    dst = Path(directory) / f"{name}.sqlite"
    shutil.copyfile(source, dst)
    return dst


def db_state(path: str | Path) -> dict[str, list[tuple]]:
    """The comparable content of a database: every row of every table, sorted; ticket
    summaries (free text) are left out."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        out = {}
        for table in (*TABLES, "refunds"):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] != "summary"]
            out[table] = sorted(conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall(), key=repr)
        return out
    finally:
        conn.close()


def db_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(json.dumps(db_state(path), default=str).encode()).hexdigest()
