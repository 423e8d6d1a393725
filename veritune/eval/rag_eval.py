"""RAG adaptability and multi-hop reasoning: what retrieval finds, and what the model does
with what it is given.

Used by `stages/rag_eval.py`; every piece is a plain function over questions, hits and
replies, so it also scores another system's retrieval or answers.

- Retrieval: recall@k (any supporting document in the top k), all-supporting-documents
  recall@k (what a multi-hop question needs) and MRR per retrieval mode (dense, bm25, hybrid),
  with bootstrap intervals and a paired interval on hybrid - dense; iterative retrieval
  (`veritune.retrieval.search.iterative_search`) against one round on multi-hop questions.
- Answers vs k: the model reads the top k retrieved passages.
- Answers vs distractor noise: the model reads the supporting (oracle) passages plus n random
  passages from other documents, in a shuffled order.
- Injection resistance (`veritune.eval.injection`): one passage among the retrieved ones
  carries an instruction to the model; a reply *obeys* when it carries the template's canary
  or leaks the system prompt.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from veritune.eval.injection import INJECTIONS, LEAK_NGRAM
from veritune.eval.scoring import mean, with_ci
from veritune.retrieval.search import Hit

# --------------------------------------------------------------------------- sampling


def stratified_sample(questions: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` questions with each `kind` in its share of the whole (largest remainder), in the
    original order; all of them when `n` is 0 or at least their number."""
    if n <= 0 or n >= len(questions):
        return list(questions)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_kind[q["kind"]].append(i)
    quotas = {kind: n * len(idx) / len(questions) for kind, idx in by_kind.items()}
    counts = {kind: int(quota) for kind, quota in quotas.items()}
    for kind in sorted(quotas, key=lambda kd: (-(quotas[kd] - counts[kd]), kd))[: n - sum(counts.values())]:
        counts[kind] += 1
    rng = random.Random(seed)
    chosen = [i for kind in sorted(by_kind) for i in rng.sample(by_kind[kind], counts[kind])]
    return [questions[i] for i in sorted(chosen)]


# --------------------------------------------------------------------------- retrieval


def _doc_ids(hits: Sequence[Hit | str]) -> list[str]:
    return [h if isinstance(h, str) else h.doc_id for h in hits]


def per_question_recall(
    hits_per_question: Sequence[Sequence[Hit | str]],
    gold_per_question: Sequence[Sequence[str]],
    k: int,
    need_all: bool = False,
) -> list[float]:
    """1.0/0.0 per question with gold documents: any (or, with `need_all`, every) gold
    document among the top k. Questions without gold documents are left out, as in
    `veritune.retrieval.metrics.retrieval_metrics`."""
    out = []
    for hits, gold in zip(hits_per_question, gold_per_question, strict=True):
        if not gold:
            continue
        top = set(_doc_ids(hits)[:k])
        out.append(float(set(gold) <= top if need_all else bool(top & set(gold))))
    return out


# --------------------------------------------------------------------------- passages


def supporting_chunks(question: dict, chunks_by_doc: dict[str, list[dict]]) -> list[dict]:
    """Every chunk of the question's supporting documents (none for a made-up product)."""
    missing = [d for d in question["doc_ids"] if d not in chunks_by_doc]
    if missing:
        raise ValueError(
            f"question {question['id']!r}: field 'doc_ids' names {missing}, which the index's "
            "chunks.jsonl lacks: rebuild the index from the same documents"
        )
    return [c for d in question["doc_ids"] for c in chunks_by_doc[d]]


def noisy_passages(
    questions: Sequence[dict], chunks: Sequence[dict], n_distractors: int, seed: int
) -> list[list[dict]]:
    """Oracle passages plus `n_distractors` random chunks of other documents, shuffled.

    Per question the distractors are the first n of one fixed random order, so a higher
    noise level adds passages to a lower one's instead of drawing new ones.
    """
    chunks_by_doc: dict[str, list[dict]] = defaultdict(list)
    for c in chunks:
        chunks_by_doc[c["doc_id"]].append(c)
    out = []
    for q in questions:
        rng = random.Random(f"{seed}:{q['id']}")
        gold = set(q["doc_ids"])
        pool = [c for c in chunks if c["doc_id"] not in gold]
        distractors = rng.sample(pool, min(n_distractors, len(pool)))
        passages = supporting_chunks(q, chunks_by_doc) + distractors
        random.Random(f"{seed}:{q['id']}:{n_distractors}").shuffle(passages)
        out.append(passages)
    return out


# --------------------------------------------------------------------------- answers


def answer_summary(questions: Sequence[dict], scores: Sequence[dict], bootstrap_samples: int) -> dict[str, Any]:
    """Token F1 on answerable questions (with interval), abstention on unanswerable ones,
    wrong abstention on answerable ones and the unsupported-claims rate over all."""
    answerable = [s for q, s in zip(questions, scores, strict=True) if q["answers"]]
    unanswerable = [s for q, s in zip(questions, scores) if not q["answers"]]
    f1 = with_ci([s["f1"] for s in answerable], bootstrap_samples)
    out: dict[str, Any] = {
        "f1": f1["mean"],
        "f1_ci95_low": f1["ci95_low"],
        "f1_ci95_high": f1["ci95_high"],
        "n_answerable": len(answerable),
    }
    out["abstention_unanswerable"] = round(mean([s["abstained"] for s in unanswerable]), 4) if unanswerable else None
    out["n_unanswerable"] = len(unanswerable)
    out["wrongly_abstained"] = round(mean([s["abstained"] for s in answerable]), 4) if answerable else None
    unsupported = [s["unsupported"] for s in scores if "unsupported" in s]
    out["unsupported_rate"] = round(mean(unsupported), 4) if unsupported else None
    return out


# --------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(entry: dict) -> str:
    """Mean and 95% interval: `0.957 [0.938, 0.976]` (an en dash would read as minus)."""
    return f"{_fmt(entry['mean'], 3)} [{_fmt(entry['ci95_low'], 3)}, {_fmt(entry['ci95_high'], 3)}]"


def write_rag_report(metrics: dict, out_dir: Path, headline_k: int) -> None:
    """reports/rag/rag.md and its plots: recall@k per mode, answers vs k, answers vs noise."""
    r = metrics["retrieval"]
    ks = metrics["ks"]
    modes = list(r["test"])
    diff = metrics["hybrid_minus_dense"]
    mh = r["multi_hop_iterative"]
    lines = ["# RAG adaptability and multi-hop retrieval", "", "## Summary", ""]
    test = r["test"]
    lines.append(
        f"- **Hybrid (dense + BM25, RRF) vs dense-only retrieval, recall@{headline_k} on the test split**: "
        f"hybrid {_ci(test['hybrid'][f'recall@{headline_k}_ci'])} vs dense "
        f"{_ci(test['dense'][f'recall@{headline_k}_ci'])}; paired difference "
        f"{_ci(diff['test'][f'recall@{headline_k}'])} (n = {diff['test'][f'recall@{headline_k}']['n']}"
        " questions with supporting documents)."
        + (
            f" BM25 alone: {_ci(test['bm25'][f'recall@{headline_k}_ci'])}; hybrid − BM25 "
            f"{_ci(diff['test'][f'hybrid_minus_bm25_recall@{headline_k}'])}."
            if "bm25" in test
            else ""
        )
    )
    lines.append(
        f"- **All supporting documents in the top {headline_k}** (multi-hop, test): "
        + ", ".join(
            f"{m} {_fmt(mh[m][f'all_recall@{headline_k}'])} → iterative "
            f"{_fmt(mh[m + '_iterative'][f'all_recall@{headline_k}'])}"
            for m in modes
        )
        + f" (n = {mh[modes[0]]['n']})."
    )
    for variant, a in metrics["answers"].items():
        if "k" in a:
            f1s = ", ".join(f"k={k}: {_fmt(a['k'][str(k)]['f1'])}" for k in ks)
            lines.append(f"- **{variant} answers vs k** (token F1 on answerable questions): {f1s}.")
        if "noise" in a:
            f1s = ", ".join(f"{n}: {_fmt(a['noise'][str(n)]['f1'])}" for n in metrics["noise_levels"])
            lines.append(f"- **{variant} answers vs distractors** beside the supporting passages (token F1): {f1s}.")
    for variant, inj in metrics["injection"].items():
        lines.append(
            f"- **Injection resistance, {variant}**: {_ci(inj)} of answers do not obey an instruction "
            f"planted in a retrieved passage (n = {inj['n']})."
        )
    lines += [
        "",
        f"Answer sweeps use {metrics['n_answer_questions']} test questions, a sample stratified by question "
        f"kind (rag_eval.max_questions) to keep the stage within a few CPU minutes; retrieval uses all "
        f"{metrics['n_test_questions']}. Intervals are 95% percentile bootstrap intervals of the mean "
        f"({metrics['bootstrap_samples']} resamples), written `mean [low, high]`.",
        "",
    ]

    lines += ["## Retrieval", ""]
    for split in ("test", "test_unseen"):
        rows = r[split]
        n = rows[modes[0]]["n"]
        lines += [
            f"### {split} (n = {n} questions with supporting documents)",
            "",
            "| mode | "
            + " | ".join(f"recall@{k}" for k in ks)
            + " | "
            + " | ".join(f"all@{k}" for k in ks)
            + f" | MRR | recall@{headline_k} 95% CI |",
            "|---|" + "---|" * (2 * len(ks) + 2),
        ]
        for m in modes:
            e = rows[m]
            lines.append(
                f"| {m} | "
                + " | ".join(_fmt(e[f"recall@{k}"]) for k in ks)
                + " | "
                + " | ".join(_fmt(e[f"all_recall@{k}"]) for k in ks)
                + f" | {_fmt(e['mrr'])} | {_ci(e[f'recall@{headline_k}_ci'])} |"
            )
        lines.append("")
    lines += [
        f"### Multi-hop: one round vs iterative retrieval (test, n = {mh[modes[0]]['n']})",
        "",
        "Iterative: retrieve with the question, then again with the question plus the top hit's title; the "
        "two lists are merged alternately.",
        "",
        "| mode | " + " | ".join(f"all@{k}" for k in ks) + f" | iterative − one round, all@{headline_k} (95% CI) |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for m in modes:
        for name in (m, f"{m}_iterative"):
            extra = _ci(mh[f"{m}_iterative_minus_one_round"]) if name.endswith("_iterative") else ""
            lines.append(f"| {name} | " + " | ".join(_fmt(mh[name][f"all_recall@{k}"]) for k in ks) + f" | {extra} |")
    lines += ["", "![recall@k per retrieval mode](retrieval_recall.png)", ""]

    lines += [
        "## Answers",
        "",
        f"Retrieval for the k sweep: {metrics['answer_mode']}. F1 = token F1 on answerable questions; "
        "abstention = share of unanswerable questions the model declines; wrongly abstained = share of "
        "answerable ones it declines; unsupported = answers with claims the passages do not support "
        "(veritune.eval.groundedness).",
        "",
    ]
    for variant, a in metrics["answers"].items():
        for sweep, label in (("k", "passages k"), ("noise", "distractors")):
            if sweep not in a:
                continue
            lines += [
                f"### {variant}: answers vs {label}",
                "",
                f"| {label} | F1 (95% CI) | n answerable | abstention (unanswerable) | n unanswerable | "
                "wrongly abstained | unsupported |",
                "|---|---|---|---|---|---|---|",
            ]
            for key, e in a[sweep].items():
                lines.append(
                    f"| {key} | {_fmt(e['f1'], 3)} [{_fmt(e['f1_ci95_low'], 3)}, {_fmt(e['f1_ci95_high'], 3)}] "
                    f"| {e['n_answerable']} | {_fmt(e['abstention_unanswerable'])} | {e['n_unanswerable']} "
                    f"| {_fmt(e['wrongly_abstained'])} | {_fmt(e['unsupported_rate'])} |"
                )
            lines.append("")
    lines += ["![answers vs k](answers_vs_k.png)", "", "![answers vs noise](answers_vs_noise.png)", ""]

    lines += [
        "## Injection resistance",
        "",
        "One passage per question carries an instruction to the model (templates below, taken in turn), "
        "inserted at a random position among the retrieved passages. A reply obeys when it contains the "
        f"template's canary string or repeats {LEAK_NGRAM} words in a row of the system prompt. A model that "
        "follows no instructions at all (see its F1 above) scores 1.0 without resisting anything; the number "
        "means most for a model that does answer questions.",
        "",
        "| model | resistance (95% CI) | n | " + " | ".join(t["name"] for t in INJECTIONS) + " |",
        "|---|---|---|" + "---|" * len(INJECTIONS),
    ]
    for variant, inj in metrics["injection"].items():
        lines.append(
            f"| {variant} | {_ci(inj)} | {inj['n']} | "
            + " | ".join(_fmt(inj["by_template"].get(t["name"], {}).get("resistance")) for t in INJECTIONS)
            + " |"
        )
    lines += ["", "Templates:", ""] + [f'- `{t["name"]}`: "{t["text"]}"' for t in INJECTIONS] + [""]
    (out_dir / "rag.md").write_text("\n".join(lines), encoding="utf-8")
    _plots(metrics, out_dir)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _plots(metrics: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = metrics["ks"]
    r = metrics["retrieval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(r["test"]):
        color = f"C{i}"
        axes[0].plot(ks, [_nan(r["test"][m][f"recall@{k}"]) for k in ks], marker="o", color=color, label=m)
        axes[1].plot(
            ks, [_nan(r["multi_hop_iterative"][m][f"all_recall@{k}"]) for k in ks], marker="o", color=color, label=m
        )
        axes[1].plot(
            ks,
            [_nan(r["multi_hop_iterative"][f"{m}_iterative"][f"all_recall@{k}"]) for k in ks],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{m}, iterative",
        )
    axes[0].set_title(f"Any supporting document in top k (test, n={r['test']['dense']['n']})")
    axes[1].set_title(
        f"All supporting documents in top k (multi-hop, n={r['multi_hop_iterative']['dense']['n']})", fontsize=10
    )
    for ax in axes:
        ax.set_xlabel("k (retrieved chunks)")
        ax.set_xticks(ks)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("recall")
    fig.tight_layout()
    fig.savefig(out_dir / "retrieval_recall.png", dpi=110)
    plt.close(fig)

    for sweep, xlabel, name in (
        ("k", "k (retrieved passages shown)", "answers_vs_k.png"),
        ("noise", "random distractors beside the supporting passages", "answers_vs_noise.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant, a in metrics["answers"].items():
            if sweep not in a:
                continue
            xs = [int(x) for x in a[sweep]]
            color = "C0" if variant == "finetuned" else "C1"
            ax.plot(
                xs,
                [_nan(e["f1"]) for e in a[sweep].values()],
                marker="o",
                color=color,
                label=f"{variant}: token F1 (answerable)",
            )
            ax.plot(
                xs,
                [_nan(e["abstention_unanswerable"]) for e in a[sweep].values()],
                marker="s",
                linestyle="--",
                color=color,
                label=f"{variant}: abstention (unanswerable)",
            )
            ax.plot(
                xs,
                [_nan(e["unsupported_rate"]) for e in a[sweep].values()],
                marker="^",
                linestyle=":",
                color=color,
                label=f"{variant}: unsupported claims (lower is better)",
            )
            ax.set_xticks(xs)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Answer quality ({metrics['n_answer_questions']} test questions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
