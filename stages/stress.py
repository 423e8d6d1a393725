"""Stage `stress`: many concurrent clients against `veritune serve`, batched vs one at a time.

    python stages/stress.py

Starts `veritune serve` (params `serve`, `index`, `build_sft`; models/base + models/adapter,
data/index) on a free loopback port with one API key per client and the rate limit off (this
measures the engine, not the limiter), drives `stress.clients` concurrent clients for
`stress.duration_s` with questions from data/split/questions_test.jsonl, and stops it with
SIGTERM. With `stress.compare_unbatched` it repeats the same load against a server started
with max_batch_size 1 (one request at a time). With `serve.backend: upstream` the server it
starts sends generation to `serve.upstream_url`, which must be up already (any
OpenAI-compatible engine, or another `veritune serve --completions-endpoint`); there is no
one-at-a-time run then, since the upstream decides its own batching. Writes metrics/stress.json (throughput,
p50/p95/p99 latency, error rate, lost requests, exactly-one-answer check, the batched /
one-at-a-time throughput ratio) and reports/stress/ (latency.png, server logs). Stopped
(SIGTERM, Ctrl-C), it stops the server it started and leaves no output behind.
"""

import asyncio
import logging
import os
import platform
import secrets
import signal
import sys
from pathlib import Path

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json
from veritune.serve.stress import ServerProcess, drive_load, free_port, plot_latency, server_counter, summarize_load

log = logging.getLogger("veritune.stress")


def run_load(
    name: str, max_batch_size: int, p, questions: list[str], keys: list[str], log_dir: Path
) -> tuple[dict, list]:
    import httpx

    args = ["--max-batch-size", str(max_batch_size), "--rate-limit-per-min", "0"]
    with ServerProcess(free_port(), api_keys=keys, log_path=log_dir / f"server-{name}.log", extra_args=args) as server:
        server.start(p.startup_timeout_s)
        # Warm-up outside the measured window: first calls pay for lazy initialisation.
        asyncio.run(
            drive_load(
                server.url,
                questions,
                keys,
                clients=2,
                duration_s=0.1,
                max_tokens=p.max_tokens,
                stream_fraction=0.5,
                timeout_s=p.client_timeout_s,
                run_name=f"{name}-warmup",
            )
        )
        before = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {keys[0]}"}).text
        log.info("stress: %s run, %d clients for %g s", name, p.clients, p.duration_s)
        records, wall_s = asyncio.run(
            drive_load(
                server.url,
                questions,
                keys,
                clients=p.clients,
                duration_s=p.duration_s,
                max_tokens=p.max_tokens,
                stream_fraction=p.stream_fraction,
                timeout_s=p.client_timeout_s,
                seed=p.seed,
                run_name=name,
            )
        )
        after = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {keys[0]}"}).text
        health = httpx.get(f"{server.url}/health").json()
        exit_code = server.stop()
    done = server_counter(after, "veritune_completions") - server_counter(before, "veritune_completions")
    tokens = server_counter(after, "veritune_completion_tokens") - server_counter(before, "veritune_completion_tokens")
    summary = summarize_load(records, wall_s, server_completions=done)
    summary["completion_tokens_per_s"] = round(tokens / wall_s, 2)
    summary["max_batch_size"] = max_batch_size
    summary["mean_batch_size"] = health["mean_batch_size"]
    summary["max_batch_size_seen"] = health["max_batch_size_seen"]
    summary["graceful_exit_code"] = exit_code
    log.info("stress: %s: %s", name, summary)
    return summary, records


def check_upstream(sp) -> None:
    """Fail before any load if the upstream does not answer (the stage does not start it)."""
    import httpx

    from veritune.serve.upstream import API_KEY_ENV, completions_url

    url = completions_url(sp.upstream_url).rsplit("/", 1)[0] + "/models"
    key = os.environ.get(API_KEY_ENV)
    try:
        httpx.get(url, timeout=10, headers={"Authorization": f"Bearer {key}"} if key else {}).raise_for_status()
    except httpx.HTTPError as e:
        raise RuntimeError(
            f"serve.backend is upstream, and the upstream at {url} does not answer ({e}): start it "
            "first (e.g. `veritune serve --port 8001 --completions-endpoint --no-retrieval`)"
        ) from None


def _terminated(signum, frame) -> None:
    # SIGTERM as an exit, not a kill: the server's context manager stops it, atomic_path drops the partial output.
    sys.exit(128 + signum)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    p = load_params("stress")
    sp = load_params("serve")
    ip = load_params("index")
    # What the server reads besides `serve` and `index` (its prompt; the agent mode's prompt,
    # date and limits): checked here so a bad value fails before any load.
    load_params("build_sft")
    load_params("agent_db")
    load_params("agent_eval")
    if not Path(ip.uri).exists():
        raise FileNotFoundError(f"no index at {ip.uri}: run `dvc repro index`")
    upstream = sp.backend == "upstream"
    if upstream:
        check_upstream(sp)
    questions = [q["question"] for q in read_jsonl("data/split/questions_test.jsonl")]
    keys = [secrets.token_urlsafe(24) for _ in range(p.clients)]
    metrics: dict = {
        "clients": p.clients,
        "duration_s": p.duration_s,
        "max_tokens": p.max_tokens,
        "stream_fraction": p.stream_fraction,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": sp.backend,
    }
    if upstream:
        metrics["upstream_url"] = sp.upstream_url
    latencies = {}
    with atomic_path("reports/stress") as out:
        out.mkdir()
        compare = p.compare_unbatched and not upstream  # an upstream batches as it does: no one-at-a-time run
        runs = [("batched", sp.max_batch_size)] + ([("unbatched", 1)] if compare else [])
        for name, batch in runs:
            metrics[name], records = run_load(name, batch, p, questions, keys, out)
            latencies[f"{name} (max_batch_size={batch})"] = [
                r["latency_s"] for r in records if r["status"] == 200 and r["problem"] is None
            ]
        if compare:
            b, u = metrics["batched"]["throughput_rps"], metrics["unbatched"]["throughput_rps"]
            metrics["throughput_ratio"] = round(b / u, 2) if u else None
            bt, ut = metrics["batched"]["completion_tokens_per_s"], metrics["unbatched"]["completion_tokens_per_s"]
            metrics["token_throughput_ratio"] = round(bt / ut, 2) if ut else None
        plot_latency(latencies, out / "latency.png")
        write_json(out / "stress_config.json", {"stress": as_dict(p), "serve": as_dict(sp)})
    write_json("metrics/stress.json", metrics)
    log.info(
        "stress: batched %s req/s, one at a time %s req/s, ratio %s",
        metrics["batched"]["throughput_rps"],
        metrics.get("unbatched", {}).get("throughput_rps"),
        metrics.get("throughput_ratio"),
    )


if __name__ == "__main__":
    main()
