"""The shop's tools: their implementations over the shop database (their specs and the check of
a call are `veritune.agent.specs`).

Read tools (`get_order`, `list_orders`, `search_kb`, `calculate`) never change anything.
Order tools are scoped to one customer (`Toolbox(customer_id=...)`): another customer's
order is "not found". Every argument is checked against its tool's schema, bounds included
(ids, amounts, string lengths), before any query runs. Write tools (`open_ticket`,
`request_refund`) are guarded further: business rules are checked, every statement is
parameterised, an episode may write at most `max_writes` rows, the connection is confined
to the shop's tables by an SQLite authorizer, and a repeated call returns the first call's
result instead of writing again (idempotent). Writes only ever touch the per-episode copy
of the database a `Toolbox` is opened on (`veritune.agent.shop.episode_database`).

Every tool returns a JSON object; a refused call returns `{"error": "..."}` whose message
says what to fix, so the model can retry.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

from veritune.agent.shop import TABLES
from veritune.agent.specs import MAX_SUMMARY_CHARS, WRITE_TOOLS, ToolError, check_call
from veritune.infer import calc

# --------------------------------------------------------------------------- calculator


def calculate(expression: str) -> int | float | str:
    """The calculator tool: `veritune.infer.calc.calculate` (numbers, ISO dates, + - * /,
    parentheses; parsed, never evaluated as Python), its errors as tool errors."""
    try:
        return calc.calculate(expression)
    except calc.CalcError as e:
        raise ToolError(str(e)) from None


# --------------------------------------------------------------------------- the toolbox


_ALLOWED_TABLES = set(TABLES) | {"refunds"}


def _authorizer(action, arg1, arg2, db_name, trigger):
    # Only reads, inserts and updates of the shop's own tables: no ATTACH, no PRAGMA
    # writes, no schema changes, whatever text reaches a query.
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION):
        return sqlite3.SQLITE_OK
    if action in (sqlite3.SQLITE_READ, sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE) and arg1 in _ALLOWED_TABLES:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_TRANSACTION:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class Toolbox:
    """The tools of one episode, over its own copy of the database.

    `customer_id` is the authenticated customer the episode acts for (the server binds it to
    the API key; `agent_eval` uses the task's own customer): every read and write sees only
    that customer's orders, and another customer's order or id is "not found", exactly as one
    that does not exist. None is staff scope (every customer), for offline replays of gold
    calls only; nothing a model drives runs unscoped (`veritune.agent.loop.run_agent` needs one).

    `allowed_writes` names the write tools this customer's request authorises (see
    `authorised_writes`); any other write is refused before it reaches the database.
    `max_writes` bounds the rows an episode may write (tickets and refunds together; an
    idempotent repeat writes nothing); None: no bound.
    """

    def __init__(
        self,
        db_path: str | Path,
        search: Callable[[str], list[dict]] | None = None,
        allowed_writes: tuple[str, ...] = WRITE_TOOLS,
        *,
        today: date,
        customer_id: str | None = None,
        max_writes: int | None = None,
    ):
        self.db_path = Path(db_path)
        self.search = search
        self.allowed_writes = allowed_writes
        self.today = today
        self.customer_id = customer_id
        self.max_writes = max_writes
        self.writes = 0  # rows this episode has written
        self.conn = sqlite3.connect(f"file:{self.db_path.resolve()}?mode=rw", uri=True)
        self.conn.row_factory = sqlite3.Row
        self.conn.set_authorizer(_authorizer)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Toolbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, name: str, parameters) -> dict:
        """Run one call; refusals come back as {"error": ...}, never as an exception."""
        try:
            return self._execute(name, parameters)
        except ToolError as e:
            return {"error": str(e)}
        except sqlite3.Error as e:
            self.conn.rollback()
            return {"error": f"database refused the operation ({e})"}

    def _execute(self, name: str, parameters) -> dict:
        check_call(name, parameters)
        if name in WRITE_TOOLS and name not in self.allowed_writes:
            raise ToolError(f"{name} needs the customer's explicit request; they did not ask for it")
        return getattr(self, f"_{name}")(**parameters)

    def _check_write_budget(self) -> None:
        """Refuse a write past `max_writes` (called just before an INSERT)."""
        if self.max_writes is not None and self.writes >= self.max_writes:
            raise ToolError(
                f"this conversation already made {self.writes} change(s), the most one conversation "
                "may make; tell the customer what was done and offer a human agent for the rest"
            )

    # -- reads

    def _order_row(self, order_id: int) -> sqlite3.Row:
        row = self.conn.execute(
            "SELECT o.*, p.name AS product, p.category, p.price, p.warranty_months, p.return_window_days "
            "FROM orders o JOIN products p ON p.sku = o.sku WHERE o.order_id = ? AND (? IS NULL OR o.customer_id = ?)",
            (int(order_id), self.customer_id, self.customer_id),
        ).fetchone()
        if row is None:  # another customer's order reads exactly like a missing one
            raise ToolError(f"no order {order_id}")
        return row

    def _get_order(self, order_id: int) -> dict:
        o = self._order_row(order_id)
        out = {
            "order_id": o["order_id"],
            "customer_id": o["customer_id"],
            "product": o["product"],
            "category": o["category"],
            "price": o["price"],
            "order_date": o["order_date"],
            "status": o["status"],
            "return_window_days": o["return_window_days"],
            "warranty_months": o["warranty_months"],
        }
        s = self.conn.execute("SELECT * FROM shipments WHERE order_id = ?", (o["order_id"],)).fetchone()
        if s is not None:
            out.update(
                carrier=s["carrier"],
                tracking=s["tracking"],
                shipped_date=s["shipped_date"],
                delivered_date=s["delivered_date"],
            )
        tickets = self.conn.execute(
            "SELECT ticket_id, category, status, summary FROM tickets WHERE order_id = ? ORDER BY ticket_id",
            (o["order_id"],),
        ).fetchall()
        if tickets:
            out["tickets"] = [dict(t) for t in tickets]
        refund = self.conn.execute("SELECT amount, reason FROM refunds WHERE order_id = ?", (o["order_id"],)).fetchone()
        if refund is not None:
            out["refund"] = dict(refund)
        return out

    def _list_orders(self, customer_id: str) -> dict:
        customer = None
        if self.customer_id is None or customer_id == self.customer_id:
            customer = self.conn.execute("SELECT * FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
        if customer is None:  # another customer reads exactly like an unknown one
            raise ToolError(f"no customer {customer_id!r} (ids look like C-101)")
        rows = self.conn.execute(
            "SELECT o.order_id, p.name AS product, o.order_date, o.status FROM orders o "
            "JOIN products p ON p.sku = o.sku WHERE o.customer_id = ? ORDER BY o.order_id",
            (customer_id,),
        ).fetchall()
        return {"customer_id": customer_id, "name": customer["name"], "orders": [dict(r) for r in rows]}

    def _search_kb(self, query: str) -> dict:
        if self.search is None:
            raise ToolError("the help centre search is not available")
        if not query.strip():
            raise ToolError("query must not be empty")
        return {"results": self.search(query)}

    def _calculate(self, expression: str) -> dict:
        return {"result": calculate(expression)}

    # -- writes: checked, parameterised, idempotent

    def _open_ticket(self, order_id: int, category: str, summary: str) -> dict:
        o = self._order_row(order_id)
        summary = summary.strip()
        if not summary or len(summary) > MAX_SUMMARY_CHARS:
            raise ToolError(f"summary must be 1-{MAX_SUMMARY_CHARS} characters")
        existing = self.conn.execute(
            "SELECT ticket_id FROM tickets WHERE order_id = ? AND category = ? AND status = 'open'",
            (o["order_id"], category),
        ).fetchone()
        if existing is not None:
            return {"ticket_id": existing["ticket_id"], "status": "open", "already_open": True}
        numbers = [int(r[0][2:]) for r in self.conn.execute("SELECT ticket_id FROM tickets")]
        ticket_id = f"T-{max(numbers, default=0) + 1:04d}"
        self._check_write_budget()
        with self.conn:
            self.conn.execute(
                "INSERT INTO tickets (ticket_id, order_id, category, status, summary) VALUES (?, ?, ?, 'open', ?)",
                (ticket_id, o["order_id"], category, summary),
            )
        self.writes += 1
        return {"ticket_id": ticket_id, "status": "open"}

    def _request_refund(self, order_id: int, amount: float, reason: str) -> dict:
        o = self._order_row(order_id)
        amount = round(float(amount), 2)
        existing = self.conn.execute(
            "SELECT refund_id, amount, reason FROM refunds WHERE order_id = ?", (o["order_id"],)
        ).fetchone()
        if existing is not None:
            if abs(existing["amount"] - amount) < 0.005 and existing["reason"] == reason:
                return {"refund_id": existing["refund_id"], "amount": existing["amount"], "already_requested": True}
            raise ToolError(f"a refund of {existing['amount']:.2f} was already requested for order {o['order_id']}")
        if o["status"] != "delivered":
            raise ToolError(f"order {o['order_id']} is {o['status']}; only delivered orders can be refunded")
        deadline = date.fromisoformat(o["order_date"]) + timedelta(days=o["return_window_days"])
        if deadline < self.today:
            raise ToolError(
                f"order {o['order_id']} is past its {o['return_window_days']}-day return window "
                f"(ended {deadline.isoformat()})"
            )
        if not 0 < amount <= o["price"]:
            raise ToolError(f"amount must be more than 0 and at most the price paid ({o['price']})")
        refund_id = f"R-{o['order_id']}"
        self._check_write_budget()
        with self.conn:
            self.conn.execute(
                "INSERT INTO refunds (refund_id, order_id, amount, reason) VALUES (?, ?, ?, ?)",
                (refund_id, o["order_id"], amount, reason),
            )
        self.writes += 1
        return {"refund_id": refund_id, "amount": amount, "status": "requested"}


def authorised_writes(request: str) -> tuple[str, ...]:
    """The write tools a customer's own words ask for: a refund, a ticket. A coarse guard
    against writes nobody asked for (a looping model, an instruction planted in a tool
    result); the task set words its requests so that this holds."""
    text = request.lower()
    allowed = []
    if re.search(r"\bticket", text):
        allowed.append("open_ticket")
    if re.search(r"\brefund", text):
        allowed.append("request_refund")
    return tuple(allowed)


def kb_search(retriever, k: int, readable: set[str] | None = None) -> Callable[[str], list[dict]]:
    """`search_kb` over a `veritune.retrieval.search.Retriever`: the top `k` chunks of a query,
    only from `readable` documents when given (training trajectories never see held-out ones)."""

    def search(query: str) -> list[dict]:
        hits = retriever.search([query], k=k if readable is None else 4 * k)[0]
        return [
            {"doc_id": h.doc_id, "title": h.title, "text": h.text}
            for h in hits
            if readable is None or h.doc_id in readable
        ][:k]

    return search
