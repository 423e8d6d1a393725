"""What `veritune serve` runs on: the loaded model and tokenizer (or an upstream client), the
retriever, and the batchers that feed them (`Service`, `load_service`), and the agent mode's
settings (`AgentSettings`, read from params.yaml by `agent_settings`).

Who generates is `serve.backend`: `builtin` decodes concurrent requests together, in
micro-batches on a CPU (`MicroBatcher` + `veritune.infer.decode.generate_batch`) and by
continuous batching with CUDA graphs on a GPU (`serve.engine`, `veritune.serve.engine`);
`upstream` sends the rendered prompt to an OpenAI-compatible engine at `serve.upstream_url`
(`veritune.serve.upstream`). Retrieval queries are batched too, so a batch's questions are
embedded and searched in one call. This process owns the Milvus Lite index directory while it
runs (one process at a time).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from veritune.core import chat
from veritune.core.config import PARAMS_FILE, load_params
from veritune.core.params import ServeParams
from veritune.infer.decode import GenerationRequest, generate_batch
from veritune.serve import agent_mode
from veritune.serve.auth import RateLimiter
from veritune.serve.batching import MicroBatcher
from veritune.serve.metrics import Metrics
from veritune.serve.schema import ApiError

log = logging.getLogger("veritune.serve")


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """What the agent mode runs with: the episode `agent_eval` runs, decoded as it decodes
    (`agent_settings` reads every field but `persist_writes` from params.yaml)."""

    db_path: str  # serve.agent_db
    system_prompt: str  # build_sft.agent_system_prompt
    tool_definitions: str  # build_sft.agent_tool_definitions: "compact" or "json_schema"
    search_k: int  # build_sft.agent_search_k: passages per search_kb call (at most serve.retrieval_k)
    today: str  # agent_db.today
    max_steps: int  # agent_eval.max_steps
    max_retries: int  # agent_eval.max_retries
    max_seconds: float  # agent_eval.max_seconds, capped by serve.request_timeout_s
    temperature: float  # agent_eval.temperature: each turn sampled at it (0: greedy)
    seed: int  # agent_eval.seed: each request's draws start from it, so a request is answered reproducibly
    constrained_calls: bool  # agent_eval.constrained_calls: tool calls under the tools' JSON-schema grammar
    max_string_chars: int  # agent_eval.max_string_chars: constrained calls' longest free-text argument
    max_writes: int  # agent_eval.max_writes: rows one request may write (tickets, refunds)
    persist_writes: bool = False  # False: writes act on a per-request copy; True: on db_path itself (a live shop)


def agent_settings(params_file: str | Path = PARAMS_FILE, db_path: str | None = None) -> AgentSettings:
    """The agent's prompt, limits and decoding as `agent_eval` runs it: `build_sft` (system
    prompt, tool definitions, search size), `agent_db` (today), `agent_eval` (steps, retries,
    seconds, temperature, seed, grammar, writes); the database is `serve.agent_db` unless
    `db_path` says otherwise."""
    sp, ap, ep, srv = (load_params(s, params_file) for s in ("build_sft", "agent_db", "agent_eval", "serve"))
    return AgentSettings(
        db_path=srv.agent_db if db_path is None else db_path,
        system_prompt=sp.agent_system_prompt,
        tool_definitions=sp.agent_tool_definitions,
        search_k=sp.agent_search_k,
        today=ap.today,
        max_steps=ep.max_steps,
        max_retries=ep.max_retries,
        max_seconds=ep.max_seconds,
        temperature=ep.temperature,
        seed=ep.seed,
        constrained_calls=ep.constrained_calls,
        max_string_chars=ep.max_string_chars,
        max_writes=ep.max_writes,
    )


class Service:
    """The loaded model and tokenizer, the retriever, and the two batchers that feed them."""

    def __init__(
        self,
        params: ServeParams,
        model,
        tokenizer,
        retriever,
        system_prompt: str,
        api_keys: list[str] | None,
        agent: AgentSettings,
        customers: dict[str, str] | None = None,
        max_positions: int | None = None,
    ):
        self.params, self.model, self.tokenizer, self.retriever = params, model, tokenizer, retriever
        self.system_prompt, self.agent = system_prompt, agent
        self.api_keys = list(api_keys or [])
        # The customer each key acts for in the agent mode (by key index); unbound keys have none.
        self.key_customers = {i: (customers or {})[k] for i, k in enumerate(self.api_keys) if k in (customers or {})}
        self.stop_ids = chat.stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        if max_positions is None:
            max_positions = (
                int(getattr(model.config, "max_position_embeddings", 1 << 30)) if model is not None else 1 << 30
            )
        self.max_positions = max_positions
        self.metrics = Metrics()
        self.limiter = RateLimiter(params.rate_limit_per_min)
        self.auth_failures = RateLimiter(params.auth_failures_per_min)  # per client address
        self.upstream, self.generator, self.engine = None, None, None
        if params.backend == "upstream":
            from veritune.serve.upstream import UpstreamClient

            self.upstream = UpstreamClient(
                params.upstream_url, params.upstream_model, params.request_timeout_s, self.stop_ids
            )
            self.engine = "upstream"
        elif engine_kind(params, model) == "continuous":
            from veritune.serve.engine import ContinuousBatchingEngine

            self.generator = ContinuousBatchingEngine(
                model,
                self.stop_ids,
                params.max_batch_size,
                params.kv_cache_tokens,
                params.prefill_tokens,
                max_pending=params.max_pending,
                name="generate",
                mixed_tokens=params.mixed_tokens,
            )
            self.max_positions = min(self.max_positions, self.generator.positions)
            self.engine = "continuous"
        else:
            self.generator = MicroBatcher(
                lambda reqs: generate_batch(self.model, reqs, self.stop_ids, self.pad_id),
                params.max_batch_size,
                params.max_wait_ms,
                params.max_pending,
                name="generate",
            )
            self.engine = "micro_batch"
        if self.generator is not None:
            self.generator.on_batch = lambda n, s: self._observe("generate", n, s)
        self.searcher = None
        if retriever is not None:
            self.searcher = MicroBatcher(
                lambda queries: retriever.search(queries, k=params.retrieval_k),
                params.max_batch_size,
                params.max_wait_ms,
                params.max_pending,
                name="search",
            )
            self.searcher.on_batch = lambda n, s: self._observe("search", n, s)
        self._grammar, self._grammar_lock = None, threading.Lock()
        self.started = time.time()
        self.in_flight = 0  # HTTP requests being handled (this one included, for /health)

    def _observe(self, stage: str, n: int, seconds: float) -> None:
        self.metrics.batch_size.labels(stage).observe(n)
        self.metrics.batch_seconds.labels(stage).observe(seconds)

    def start(self) -> Service:
        if self.generator is not None:
            self.generator.start()
        if self.searcher is not None:
            self.searcher.start()
        return self

    def stop_batchers(self) -> None:
        """Take no new work; finish what is queued."""
        if self.searcher is not None:
            self.searcher.stop()
        if self.generator is not None:
            self.generator.stop()

    def close(self) -> None:
        """Finish queued work, then free the index (its lock) for other processes."""
        self.stop_batchers()
        if self.upstream is not None:
            self.upstream.close()
        if self.retriever is not None:
            self.retriever.close()
            self.retriever = None

    def agent_available(self) -> bool:
        return agent_mode._agent_entry_point() is not None and Path(self.agent.db_path).is_file()

    # --- what the agent gets: blocking calls through the same batchers (see `agent_completion`)
    def seeded(self, seed: int | None):
        """A generator of sampling draws on the model's device, seeded with `seed` (None: torch's
        global one)."""
        if seed is None or self.model is None:
            return None
        import torch

        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)

    def sampler(self):
        """The draws of one agent request, from `agent.seed` (None when the agent mode decodes
        greedily)."""
        return self.seeded(self.agent.seed) if self.agent.temperature > 0 else None

    def generate_raw(self, prompt_text: str, max_new_tokens: int, generator=None) -> str:
        """The model's continuation of an already rendered prompt (`agent.loop.episode_prompt`),
        tokenized as `ModelPolicy` does, decoded as `agent_eval` decodes (`agent.temperature`,
        the request's `generator`; the tool-call grammar), special tokens kept and the stop
        token it wrote appended, so that `agent.loop.parse_reply` sees the whole call
        (`<|python_tag|>...<|eom_id|>`, `<tool_call>...</tool_call><|im_end|>`)."""
        if self.upstream is not None:
            from veritune.serve.upstream import UpstreamError

            try:
                done = self.upstream.complete_sync(
                    prompt_text,
                    max_new_tokens,
                    keep_special=True,
                    temperature=self.agent.temperature,
                    seed=self.agent.seed,
                )
            except UpstreamError as e:
                raise ApiError(e.status, str(e)) from None
            self.metrics.prompt_tokens.inc(done.prompt_tokens)
            self.metrics.completion_tokens.inc(done.completion_tokens)
            stop = (
                self.tokenizer.decode([done.stop_token_id], skip_special_tokens=False)
                if done.stop_token_id is not None
                else ""
            )
            return done.text + stop
        ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        grammar = self.call_grammar()
        gen = GenerationRequest(
            list(ids),
            max_new_tokens,
            constraint=grammar.constraint() if grammar is not None else None,
            temperature=self.agent.temperature,
            generator=generator,
        )
        try:
            completion = self.generator.submit(gen).result(self.params.request_timeout_s)
        finally:
            gen.cancelled.set()  # a no-op once finished; frees the batch slot of one given up on
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.completion_tokens.inc(len(completion.token_ids))
        stop = [completion.stop_token_id] if completion.stop_token_id is not None else []
        return self.tokenizer.decode(completion.token_ids + stop, skip_special_tokens=False)

    def call_grammar(self):
        """The tool-call grammar (`veritune.infer.constraints`) when the agent mode constrains calls;
        compiled on first use (it reads the whole vocabulary), then shared by every request."""
        if not self.agent.constrained_calls or self.model is None:
            return None  # an upstream decodes calls freely: the grammar needs this process's logits
        with self._grammar_lock:
            if self._grammar is None:
                from veritune.agent.specs import TOOLS
                from veritune.infer.constraints import ToolCallGrammar

                self._grammar = ToolCallGrammar(
                    self.tokenizer, self.model.config.vocab_size, TOOLS, max_string_chars=self.agent.max_string_chars
                )
        return self._grammar

    def kb_search(self, query: str) -> list[dict]:
        """`search_kb` for the agent: the top `agent.search_k` passages as the tool returns them."""
        hits = self.searcher.submit(query).result(self.params.request_timeout_s)
        return [{"doc_id": h.doc_id, "title": h.title, "text": h.text} for h in hits[: self.agent.search_k]]


def engine_kind(params: ServeParams, model) -> str:
    """`serve.engine`, with auto resolved: continuous batching where the model is on CUDA and
    the engine runs it (veritune.serve.engine.supported), micro-batches elsewhere."""
    if params.engine != "auto":
        return params.engine
    from veritune.serve.engine import supported

    on_cuda = next(model.parameters()).device.type == "cuda"
    return "continuous" if on_cuda and supported(model) is None else "micro_batch"


def load_service(
    params: ServeParams,
    index_params,
    system_prompt: str,
    api_keys: list[str] | None,
    agent: AgentSettings,
    retrieval: bool | None = None,
    customers: dict[str, str] | None = None,
) -> Service:
    """Load the model (adapter merged; with `serve.backend: upstream` only its tokenizer) and
    open the index named by `index_params` (None: no retrieval)."""
    import torch

    from veritune.model.modeling import load_model, load_tokenizer

    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    for name in ("base_dir", "adapter_dir"):
        path = getattr(params, name)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"serve.{name} {path} does not exist: run `dvc repro train` (or set serve.{name})")
    retriever = None
    if (params.retrieval if retrieval is None else retrieval) and index_params is not None:
        from veritune.retrieval.search import open_retriever

        retriever = open_retriever(index_params)
    if params.backend == "upstream":
        # The prompt is rendered and counted here, in the checkpoint's own format; the weights stay upstream.
        tokenizer_dir = (
            params.adapter_dir
            if params.adapter_dir and (Path(params.adapter_dir) / "tokenizer_config.json").exists()
            else params.base_dir
        )
        tokenizer = load_tokenizer(tokenizer_dir)
        positions = None
        if (Path(params.base_dir) / "config.json").exists():
            from transformers import AutoConfig

            positions = int(getattr(AutoConfig.from_pretrained(params.base_dir), "max_position_embeddings", 1 << 30))
        return Service(
            params, None, tokenizer, retriever, system_prompt, api_keys, agent, customers, max_positions=positions
        )
    model = load_model(params.base_dir)
    if params.adapter_dir:
        from peft import PeftModel

        # Merged once at load: the same function, no per-layer adapter cost per token.
        model = PeftModel.from_pretrained(model, params.adapter_dir).merge_and_unload()
    if params.dtype != "auto":
        model = model.to(getattr(torch, params.dtype))
    model.eval()
    tokenizer = load_tokenizer(params.adapter_dir or params.base_dir)
    return Service(params, model, tokenizer, retriever, system_prompt, api_keys, agent, customers)
