"""Load testing `veritune serve`: a server subprocess on loopback, many concurrent clients.

    with ServerProcess(port, max_batch_size=32, api_keys=keys, log_path=...) as server:
        records = asyncio.run(drive_load(server.url, questions, keys, clients=32, duration_s=60, ...))
    summary = summarize_load(records, wall_s)

Each client sends one request at a time, back to back, until the duration is over; requests
still in flight then are awaited (up to the client timeout). Every request carries a unique
`X-Request-ID`, and an answer only counts if it is exactly one answer to that id: one JSON
completion with that id and one choice, or one event stream whose chunks all carry that id,
with exactly one finish and exactly one `[DONE]`. A request with no answer (a timeout, a
dropped connection) is *lost*; an HTTP error status is an *error*.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veritune import cli  # the server this drives is `python -m veritune.cli serve`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`veritune serve` as a child process on 127.0.0.1; `stop()` sends SIGTERM (a graceful drain)."""

    def __init__(
        self,
        port: int,
        *,
        api_keys: Sequence[str] = (),
        log_path: str | Path,
        extra_args: Sequence[str] = (),
        cwd: str | Path = ".",
        env: dict | None = None,
    ):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.args = [
            sys.executable,
            "-m",
            cli.__name__,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {}), "VERITUNE_API_KEYS": ",".join(api_keys)}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> ServerProcess:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"veritune serve exited with {self.proc.returncode} while starting; log tail:\n{tail}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"veritune serve did not answer /health within {timeout_s:g} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: in-flight requests finish, then the process exits."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            if hasattr(self, "_log"):
                self._log.close()


# --------------------------------------------------------------------------- clients


def check_completion(body: dict, request_id: str) -> str | None:
    """None if `body` is exactly one answer to `request_id`, else what is wrong with it."""
    if body.get("id") != f"chatcmpl-{request_id}":
        return f"answer id {body.get('id')!r} is not for request {request_id}"
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return f"{len(choices) if isinstance(choices, list) else 'no'} choices, expected 1"
    if not isinstance(choices[0].get("message", {}).get("content"), str):
        return "the choice has no message content"
    return None


def check_stream(lines: list[str], request_id: str) -> tuple[str | None, str]:
    """(problem or None, the streamed text) for the `data:` lines of one event stream."""
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if events.count("[DONE]") != 1 or events[-1] != "[DONE]":
        return f"{events.count('[DONE]')} [DONE] events (must be exactly one, last)", ""
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {next(c for c in chunks if 'error' in c)['error'].get('message')}", ""
    if any(c.get("id") != f"chatcmpl-{request_id}" for c in chunks):
        return f"a chunk is not for request {request_id}", ""
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")]
    if len(finishes) != 1:
        return f"{len(finishes)} finish events, expected 1", ""
    return None, "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


async def one_request(
    client, url: str, key: str, request_id: str, question: str, max_tokens: int, stream: bool
) -> dict[str, Any]:
    import httpx

    payload = {
        "model": "veritune",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}
    record: dict[str, Any] = {"id": request_id, "stream": stream, "status": None, "problem": None}
    started = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=headers) as r:
                record["status"] = r.status_code
                lines = [line async for line in r.aiter_lines()]
            if r.status_code == 200:
                record["problem"], text = check_stream(lines, request_id)
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=payload, headers=headers)
            record["status"] = r.status_code
            if r.status_code == 200:
                body = r.json()
                record["problem"] = check_completion(body, request_id)
                record["completion_tokens"] = body.get("usage", {}).get("completion_tokens", 0)
        if record["status"] != 200:
            record["problem"] = f"HTTP {record['status']}"
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as e:
        record["lost"] = True
        record["problem"] = f"{type(e).__name__}: {e}"[:200]
    record["latency_s"] = time.perf_counter() - started
    record["end"] = time.perf_counter()
    return record


async def drive_load(
    url: str,
    questions: Sequence[str],
    keys: Sequence[str],
    *,
    clients: int,
    duration_s: float,
    max_tokens: int,
    stream_fraction: float,
    timeout_s: float,
    seed: int = 0,
    run_name: str = "run",
) -> tuple[list[dict], float]:
    """Run `clients` concurrent clients for `duration_s`; returns (one record per request, wall seconds)."""
    import httpx

    rng = random.Random(seed)
    plans = [random.Random(rng.random()) for _ in range(clients)]
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    started = time.perf_counter()
    end = started + duration_s

    async def client_loop(i: int) -> None:
        n = 0
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
            while time.perf_counter() < end:
                plan = plans[i]
                records.append(
                    await one_request(
                        client,
                        url,
                        keys[i % len(keys)],
                        f"{run_name}-c{i}-r{n}",
                        plan.choice(questions),
                        max_tokens,
                        stream=plan.random() < stream_fraction,
                    )
                )
                n += 1

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return records, time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summarize_load(records: Sequence[dict], wall_s: float, server_completions: float | None = None) -> dict[str, Any]:
    answered = [r for r in records if r["status"] == 200 and r["problem"] is None]
    lost = [r for r in records if r.get("lost")]
    errors = [r for r in records if not r.get("lost") and (r["status"] != 200 or r["problem"] is not None)]
    latencies = [r["latency_s"] for r in answered]
    by_problem: dict[str, int] = {}
    for r in errors + lost:
        key = r["problem"].split(":")[0]
        by_problem[key] = by_problem.get(key, 0) + 1
    n = len(records)
    out = {
        "requests": n,
        "answered": len(answered),
        "errors": len(errors),
        "lost": len(lost),
        "error_rate": round((len(errors) + len(lost)) / n, 4) if n else None,
        "problems": by_problem,
        "streamed": sum(r["stream"] for r in records),
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(answered) / wall_s, 3) if wall_s else None,
        "completion_tokens_per_s": round(sum(r.get("completion_tokens", 0) for r in answered) / wall_s, 2)
        if wall_s
        else None,
        "latency_s": {f"p{q}": round(percentile(latencies, q), 4) if latencies else None for q in (50, 95, 99)},
        "latency_max_s": round(max(latencies), 4) if latencies else None,
    }
    if server_completions is not None:
        # Every answer the server finished reached exactly one client, and none came from nowhere.
        out["server_completions"] = int(server_completions)
        out["exactly_one_answer_each"] = int(server_completions) == len(answered) and not lost
    return out


def server_counter(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus counter's samples (all label sets) in a /metrics page."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def plot_latency(runs: dict[str, Sequence[float]], path: str | Path) -> None:
    """Latency CDFs of several runs in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, latencies in runs.items():
        xs = sorted(latencies)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{name} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (s, log scale)")
    ax.set_ylabel("share of answered requests")
    ax.set_title("veritune serve: request latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
