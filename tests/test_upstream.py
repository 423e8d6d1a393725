"""`serve.backend: upstream` against a real second server process (a veritune on the built-in
backend with /v1/completions on): the same answers and citations as the built-in backend, 502
for a dead upstream, 504 for a slow one, recovery when it returns, and the stress stage driven
through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import REPO
from tests.test_serve import KEY, chat, index_uri, live_project, start_server  # noqa: F401 (fixtures)
from veritune.serve.stress import ServerProcess, free_port

HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTION = chat("How do I reset the Nimbus router?", max_tokens=12)


def start_upstream(project, port: int, *args: str) -> ServerProcess:
    """A second `veritune serve` on the built-in backend: no keys (loopback), no index, raw completions on."""
    server = ServerProcess(
        port,
        log_path=project / f"upstream-{port}.log",
        cwd=project,
        env={"PYTHONPATH": str(REPO)},
        extra_args=["--no-retrieval", "--completions-endpoint", *args],
    )
    return server.start(timeout_s=120)


def ask(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=timeout)


def streamed(url: str, body: dict) -> tuple[int, str, list[dict]]:
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS, timeout=30
    ) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    if r.status_code != 200:
        return r.status_code, "", []
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    return 200, "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks


def completions_done(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("veritune_completions_total")
    )


def test_upstream_backend_answers_as_builtin_fails_clearly_and_recovers(live_project):
    with start_server(live_project) as builtin:
        own = ask(builtin.url, QUESTION).json()
    assert own["usage"]["completion_tokens"] > 0
    port = free_port()
    upstream = start_upstream(live_project, port)
    try:
        front = start_server(
            live_project,
            "--backend",
            "upstream",
            "--upstream-url",
            f"http://127.0.0.1:{port}/v1",
            "--request-timeout-s",
            "4",
        )
        try:
            # Generation happens upstream; retrieval, citations and the prompt stay in front.
            health = httpx.get(f"{front.url}/health").json()
            assert health["engine"] == "upstream" and health["upstream"].endswith(f"{port}/v1/completions")
            before = completions_done(upstream.url)
            via = ask(front.url, QUESTION).json()
            assert via["choices"][0]["message"] == own["choices"][0]["message"]  # same model, prompt, greedy
            assert via["citations"] == own["citations"] and via["citations"]
            assert via["usage"] == own["usage"]
            status, text, chunks = streamed(front.url, QUESTION)
            assert status == 200 and text == own["choices"][0]["message"]["content"]
            assert chunks[0]["citations"] == own["citations"]
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
                own["choices"][0]["finish_reason"]
            ]
            assert completions_done(upstream.url) == before + 2

            upstream.kill()  # dead upstream: a clear 502, at once, for plain and streamed requests
            started = time.monotonic()
            dead = ask(front.url, QUESTION)
            assert dead.status_code == 502 and "unreachable" in dead.json()["error"]["message"]
            assert time.monotonic() - started < 5
            assert streamed(front.url, QUESTION)[0] == 502
            assert httpx.get(f"{front.url}/health").status_code == 200  # the front itself is fine

            # A slow upstream (its batch waits 8 s to fill) is a 504 after serve.request_timeout_s.
            slow = start_upstream(live_project, port, "--max-wait-ms", "8000")
            started = time.monotonic()
            late = ask(front.url, QUESTION)
            waited = time.monotonic() - started
            slow.kill()
            assert late.status_code == 504, late.text
            assert 3.5 < waited < 8, waited

            upstream = start_upstream(live_project, port)  # back: served again, the same answer
            again = ask(front.url, QUESTION)
            assert again.status_code == 200 and again.json()["choices"] == own["choices"]
            log = (live_project / "server.log").read_text()
            assert "Traceback" not in log and " 500 " not in log
        finally:
            front.kill()
    finally:
        upstream.kill()


def test_completions_endpoint_is_off_unless_asked_for(live_project):
    with start_server(live_project) as server:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "veritune", "prompt": "hi"}, headers=HEADERS)
    assert r.status_code == 404 and "serve.completions_endpoint" in r.json()["error"]["message"]


def test_stress_stage_through_an_upstream_loses_nothing(live_project):
    questions = [
        "How do I reset the Nimbus router?",
        "How long is parental leave?",
        "How do I set up the VPN?",
        "How often should the kettle be descaled?",
    ]
    split = live_project / "data" / "split"
    split.mkdir(parents=True)
    (split / "questions_test.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(questions))
    )
    port = free_port()
    params = yaml.safe_load((live_project / "params.yaml").read_text())
    params["serve"].update(backend="upstream", upstream_url=f"http://127.0.0.1:{port}/v1")
    params["stress"].update(
        clients=4, duration_s=6, max_tokens=8, stream_fraction=0.5, compare_unbatched=True, startup_timeout_s=120
    )
    (live_project / "params.yaml").write_text(yaml.safe_dump(params))
    with start_upstream(live_project, port, "--backend", "builtin") as upstream:
        before = completions_done(upstream.url)
        run = subprocess.run(
            [sys.executable, str(REPO / "stages" / "stress.py")],
            cwd=live_project,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        generated = completions_done(upstream.url) - before
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((live_project / "metrics" / "stress.json").read_text())
    batched = metrics["batched"]
    assert metrics["backend"] == "upstream" and "unbatched" not in metrics  # the upstream batches as it does
    assert batched["requests"] >= 8 and batched["streamed"] >= 1
    assert (batched["errors"], batched["lost"]) == (0, 0) and batched["exactly_one_answer_each"]
    assert generated >= batched["answered"]  # every answer was generated upstream (plus the warm-up's)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_stopped_stress_stage_stops_its_server_and_leaves_no_output(live_project):
    split = live_project / "data" / "split"
    split.mkdir(parents=True)
    (split / "questions_test.jsonl").write_text(json.dumps({"id": "q0", "question": "How long is parental leave?"}))
    params = yaml.safe_load((live_project / "params.yaml").read_text())
    params["stress"].update(clients=2, duration_s=120, max_tokens=8, startup_timeout_s=120)
    (live_project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = subprocess.Popen(
        [sys.executable, str(REPO / "stages" / "stress.py")],
        cwd=live_project,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (server := _children(stage.pid)):
            time.sleep(0.2)
        assert server, "the stage never started its server"
        time.sleep(3)  # the server loading, or the load running
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(60) == 128 + signal.SIGTERM
    finally:
        stage.kill()
    assert not Path(f"/proc/{server[0]}").exists(), "the server outlived its stage"
    reports = live_project / "reports"
    assert not (reports / "stress").exists() and not list(reports.glob(".stress.*"))  # nothing half-written
    assert not (live_project / "metrics" / "stress.json").exists()


def test_agent_turns_through_an_upstream_keep_special_tokens_and_the_stop_token(live_project, tiny_checkpoint):
    """The agent's raw turns (`Service.generate_raw`) come back from the upstream exactly as the
    built-in backend writes them: special tokens kept, the stop token that ended the turn appended;
    greedy, and sampled at the agent's temperature from its seed (the upstream gets both)."""
    import dataclasses

    from tests.conftest import REPO, params
    from veritune.model.modeling import load_model, load_tokenizer
    from veritune.serve.service import Service, agent_settings

    tokenizer = load_tokenizer(tiny_checkpoint)
    sampled = dataclasses.replace(agent_settings(REPO / "params.yaml"), constrained_calls=False)  # an upstream
    greedy = dataclasses.replace(sampled, temperature=0.0)  # decodes calls freely
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Where is my order 1042?", "Open a ticket: my kettle leaks.", "Refund order 1001")
    ]
    model = load_model(tiny_checkpoint).eval()
    own = {}
    for agent in (greedy, sampled):
        local = Service(params("serve", max_new_tokens=48), model, tokenizer, None, "", None, agent).start()
        try:
            own[agent.temperature] = [local.generate_raw(p, 40, local.sampler()) for p in prompts]
        finally:
            local.stop_batchers()
    port = free_port()
    with start_upstream(live_project, port) as upstream:
        for agent in (greedy, sampled):
            remote = Service(
                params("serve", max_new_tokens=48, backend="upstream", upstream_url=f"{upstream.url}/v1"),
                None,
                tokenizer,
                None,
                "",
                None,
                agent,
            )
            try:
                via = [remote.generate_raw(p, 40) for p in prompts]
            finally:
                remote.close()
            assert via == own[agent.temperature]
    assert all(len(text) > 10 for text in own[0.0])
