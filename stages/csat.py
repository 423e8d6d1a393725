"""Stage `csat`: simulated customers hold multi-turn conversations with the base and the
fine-tuned model (RAG every turn); a transparent rubric scores each 1-5.

    python stages/csat.py

Reads models/base/, models/adapter/, data/index/, data/split/questions_test.jsonl and params
`csat`, `build_sft` (system prompt, passages per turn) and `index`; writes metrics/csat.json
(per model: mean CSAT with a bootstrap 95% interval, the 1..5 distribution, resolution,
wrong-refusal and misled rates, per persona) and reports/csat/ (conversations.jsonl with every
turn and verdict, csat_histogram.png, csat_config.json). The personas and the rubric are in
veritune/eval/csat.py's docstring.
"""

import dataclasses
import logging

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.eval.csat import csat_score, make_customers, plot_histogram, simulate, summarize_csat, turn_messages
from veritune.infer.decode import generate
from veritune.model.modeling import load_model, load_tokenizer
from veritune.retrieval.search import open_retriever

log = logging.getLogger("veritune.csat")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from peft import PeftModel

    p = load_params("csat")
    sp = load_params("build_sft")
    ip = load_params("index")
    customers = make_customers(read_jsonl("data/split/questions_test.jsonl"), p.conversations, p.seed)
    tokenizer = load_tokenizer("models/adapter")
    model = load_model("models/base")
    metrics: dict = {}
    records: list[dict] = []
    with open_retriever(ip) as retriever:
        for variant in ("base", "finetuned"):
            if variant == "finetuned":
                model = PeftModel.from_pretrained(model, "models/adapter").merge_and_unload()
            model.eval()

            def answer(batch, variant=variant, model=model):
                hits = retriever.search([user for _, user in batch], k=sp.context_chunks)
                passages = [[dataclasses.asdict(h) for h in row] for row in hits]
                convs = [
                    turn_messages(sp.system_prompt, history, user, ps) for (history, user), ps in zip(batch, passages)
                ]
                replies = generate(model, tokenizer, convs, p.max_new_tokens, p.batch_size, desc=f"csat {variant}")
                return list(zip(replies, passages))

            conversations = simulate(customers, answer, p.max_turns, p.impatient_turns, p.resolve_f1)
            scored = [csat_score(v, p.rubric) for v in conversations]
            metrics[variant] = summarize_csat(scored, [c["persona"] for c in customers], p.bootstrap_samples)
            for v, s in zip(conversations, scored):
                c = v["customer"]
                records.append(
                    {
                        "variant": variant,
                        "customer": c["id"],
                        "persona": c["persona"],
                        "goals": [g["id"] for g in c["goals"]],
                        "outcome": v["outcome"],
                        **s,
                        "turns": v["turns"],
                    }
                )
            log.info(
                "csat %s: mean %.2f, distribution %s",
                variant,
                metrics[variant]["csat_mean"],
                metrics[variant]["distribution"],
            )
    write_json("metrics/csat.json", metrics)
    with atomic_path("reports/csat") as out:
        out.mkdir()
        write_jsonl(out / "conversations.jsonl", records)
        plot_histogram(metrics, out / "csat_histogram.png")
        write_json(out / "csat_config.json", {"csat": as_dict(p), "build_sft": as_dict(sp), "index": as_dict(ip)})


if __name__ == "__main__":
    main()
