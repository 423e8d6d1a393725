"""The server's Prometheus metrics (GET /metrics): requests by path and status, latency
histograms, requests in flight, batch sizes and times, completions and tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "veritune_http_requests", "HTTP requests answered", ["method", "path", "status"], registry=r
        )
        self.latency = Histogram(
            "veritune_http_request_duration_seconds",
            "HTTP request latency",
            ["path"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.in_flight = Gauge("veritune_http_in_flight_requests", "requests being handled", registry=r)
        self.batch_size = Histogram(
            "veritune_batch_size", "requests per batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_seconds = Histogram(
            "veritune_batch_duration_seconds",
            "time per batch",
            ["stage"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.completions = Counter("veritune_completions", "chat completions finished", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("veritune_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("veritune_completion_tokens", "tokens generated", registry=r)
