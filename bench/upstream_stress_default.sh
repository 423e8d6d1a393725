#!/usr/bin/env bash
# The stress stage through an upstream on the default model, on this machine's CPU:
# veritune (serve.backend: upstream) -> a second veritune (built-in backend, --completions-endpoint).
#
#   bench/upstream_stress_default.sh [OUT.json]      # after `make repro` (models/, data/index)
#
# Works in a scratch project beside the repo's outputs (the index copied: Milvus Lite lets one
# process open it), so metrics/ and reports/ of the repo are left alone. Prints the batched
# load's counts and how many completions the upstream generated.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/bench/results/upstream_stress_default_cpu.json}
PY=$REPO/.venv/bin/python
P=$(mktemp -d)
trap 'kill $UP 2>/dev/null || true; rm -rf "$P"' EXIT
mkdir -p "$P/data/split" "$P/data/agent" "$P/models"
cp -r "$REPO/data/index" "$P/data/index"
cp "$REPO/data/split/questions_test.jsonl" "$P/data/split/"
cp "$REPO/data/agent/business.sqlite" "$P/data/agent/"
ln -s "$REPO/models/base" "$P/models/base"
ln -s "$REPO/models/adapter" "$P/models/adapter"
PORT=$($PY -c "from veritune.serve.stress import free_port; print(free_port())")
$PY - "$REPO/params.yaml" "$P/params.yaml" "$PORT" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["serve"].update(backend="upstream", upstream_url=f"http://127.0.0.1:{sys.argv[3]}/v1")
yaml.safe_dump(p, open(sys.argv[2], "w"))
PY
cd "$P"
export PYTHONPATH=$REPO HF_HUB_OFFLINE=1
$PY -m veritune.cli serve --host 127.0.0.1 --port "$PORT" --backend builtin --completions-endpoint --no-retrieval \
    > upstream.log 2>&1 &
UP=$!
for _ in $(seq 180); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
done_upstream() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^veritune_completions_total/ {s += $2} END {print s + 0}'; }
before=$(done_upstream)
$PY "$REPO/stages/stress.py" > stress.log 2>&1
after=$(done_upstream)
$PY - "$P/metrics/stress.json" "$OUT" "$before" "$after" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["upstream_completions_during_the_stage"] = float(sys.argv[4]) - float(sys.argv[3])
json.dump(d, open(sys.argv[2], "w"), indent=2)
b = d["batched"]
print({k: d[k] for k in ("backend", "clients", "duration_s", "max_tokens", "stream_fraction")})
print({k: b[k] for k in ("requests", "answered", "streamed", "errors", "lost", "exactly_one_answer_each")},
      "upstream completions:", d["upstream_completions_during_the_stage"])
PY
