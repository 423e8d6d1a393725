"""Who may call the API: API keys, the customer a key acts for, and rate limits.

Keys come from `VERITUNE_API_KEYS` (comma-separated) or the file `VERITUNE_API_KEYS_FILE`
names (one per line, optionally followed by the customer id the key acts for) and are
compared in constant time; without keys the server only binds to loopback. Each key (each
client address without keys) has a token-bucket rate limit; failed authentications are
limited per client address (`serve.auth_failures_per_min`, then 429).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
from pathlib import Path

KEYS_ENV, KEYS_FILE_ENV = "VERITUNE_API_KEYS", "VERITUNE_API_KEYS_FILE"


def _key_entries(environ: dict | None = None) -> list[tuple[str, str | None]]:
    """(key, customer id or None) from VERITUNE_API_KEYS (comma-separated entries) and/or the
    file VERITUNE_API_KEYS_FILE names (one entry a line). An entry is `<key>` or
    `<key> <customer_id>`: a key bound to a customer may use the agent mode, which acts on
    that customer's orders only."""
    environ = os.environ if environ is None else environ
    entries = [e.strip() for e in environ.get(KEYS_ENV, "").split(",") if e.strip()]
    path = environ.get(KEYS_FILE_ENV)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{KEYS_FILE_ENV}={path}: no such file (one API key per line, "
                "optionally followed by the customer id it acts for)"
            )
        entries += [
            line.strip()
            for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
    out = []
    for entry in entries:
        parts = entry.split()
        if len(parts) > 2:
            raise ValueError(
                "an API key entry is `<key>` or `<key> <customer_id>`; one has "
                f"{len(parts)} fields (keys must not contain spaces)"
            )
        out.append((parts[0], parts[1] if len(parts) == 2 else None))
    if any(len(k) < 16 for k, _ in out):
        raise ValueError(
            "API keys must be at least 16 characters (e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`)"
        )
    return out


def load_api_keys(environ: dict | None = None) -> list[str]:
    """Keys from VERITUNE_API_KEYS (comma-separated) and/or the file VERITUNE_API_KEYS_FILE names."""
    return [key for key, _ in _key_entries(environ)]


def load_key_customers(environ: dict | None = None) -> dict[str, str]:
    """key -> the customer id it is bound to, for the keys that are bound (see `_key_entries`)."""
    return {key: customer for key, customer in _key_entries(environ) if customer is not None}


def unknown_customers(customers: dict[str, str], db_path: str | Path) -> list[str]:
    """The customer ids keys are bound to that the shop database does not know (a typo in the
    keys file would otherwise read as a customer without orders)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True)
    try:
        known = {row[0] for row in conn.execute("SELECT customer_id FROM customers")}
    finally:
        conn.close()
    return sorted(set(customers.values()) - known)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def match_key(presented: str, keys: list[str]) -> int | None:
    """Index of the key equal to `presented`; every key is compared, each in constant time."""
    found = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(presented.encode("utf-8"), key.encode("utf-8")):
            found = i
    return found


class RateLimiter:
    """A token bucket per client: `per_min` requests a minute, bursts up to `per_min`."""

    def __init__(self, per_min: int):
        self.per_min = per_min
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def blocked_for(self, client: str) -> float:
        """Seconds until `client` has a request left (0: it has one); counts nothing."""
        if self.per_min <= 0:
            return 0.0
        rate = self.per_min / 60.0
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_min), time.monotonic()))
        tokens = min(float(self.per_min), tokens + (time.monotonic() - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def retry_after(self, client: str) -> float:
        """0 if the request may go ahead (and is counted), else seconds until it may."""
        if self.per_min <= 0:
            return 0.0
        rate = self.per_min / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_min), now))
            tokens = min(float(self.per_min), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate
