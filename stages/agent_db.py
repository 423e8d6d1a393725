"""Stage `agent_db`: the shop's business database and the agent task set.

    python stages/agent_db.py

Reads data/raw/business/{customers,products,orders,shipments,tickets}.jsonl,
data/raw/agent_tasks.jsonl and params `agent_db`; validates them (ids unique, foreign keys
resolve, gold calls match their tools' schemas and succeed on the database; a bad record
is reported by id and field) and writes data/agent/business.sqlite,
data/agent/tasks_{train,test}.jsonl, data/agent/agent_db.json and metrics/agent_db.json.
"""

import logging
from collections import Counter
from datetime import date

from veritune.agent.shop import SHOP_DB, TABLES, build_database
from veritune.agent.tasks import TaskError, expected_state, validate_tasks
from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json, write_jsonl

log = logging.getLogger("veritune.agent_db")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("agent_db")
    tables = {t: read_jsonl(f"data/raw/business/{t}.jsonl") for t in TABLES}
    tasks = read_jsonl("data/raw/agent_tasks.jsonl")
    problems = validate_tasks(tasks)
    if problems:
        raise TaskError("agent tasks have problems:\n  - " + "\n  - ".join(problems[:50]))
    with atomic_path(SHOP_DB.parent) as out:
        out.mkdir()
        build_database(tables, out / SHOP_DB.name)
        # Every task's gold writes must succeed on the database as of `today`.
        today = date.fromisoformat(p.today)
        for task in tasks:
            expected_state(task, out / SHOP_DB.name, today)
        for split in ("train", "test"):
            write_jsonl(out / f"tasks_{split}.jsonl", [t for t in tasks if t["split"] == split])
        write_json(out / "agent_db.json", as_dict(p))
    summary = {
        "rows": {t: len(rows) for t, rows in tables.items()},
        "tasks": dict(Counter(t["split"] for t in tasks)),
        "task_kinds": dict(sorted(Counter(t["kind"] for t in tasks).items())),
    }
    write_json("metrics/agent_db.json", summary)
    log.info("agent_db: %s", summary)


if __name__ == "__main__":
    main()
