"""The release report: the gate's decision first, then the evidence it rests on, for a manager
(`reports/release/report.md` and a self-contained `report.html`).

`release_blocks` lays the report out as blocks (headings, paragraphs, tables, images) once;
`render_markdown` and `render_html` write the same blocks in each format.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from veritune.eval.evaluation import CONTEXT_MODES

HEADLINE_LABELS = [
    ("rag_f1_unseen", "Token F1, answerable, documents held out of training (RAG)", True),
    ("rag_f1_answerable", "Token F1, all answerable (RAG)", True),
    ("rag_em_answerable", "Exact match, answerable (RAG)", True),
    ("rag_numeric_match_answerable", "Numeric match, answerable with a number (RAG)", True),
    ("closed_book_f1_answerable", "Token F1, answerable, closed-book", True),
    ("oracle_f1_answerable", "Token F1, answerable, oracle context", True),
    ("rag_abstention_unanswerable", "Abstention on unanswerable (RAG)", True),
    ("rag_abstention_false_premise", "Abstention on false-premise questions (RAG)", True),
    ("oracle_abstention_unanswerable", "Abstention on unanswerable, oracle context", True),
    ("rag_wrong_refusal_answerable", "Wrongly refused answerable questions (RAG)", False),
    ("rag_unsupported_answerable", "Answers with unsupported claims, answerable (RAG)", False),
]


def _flatten(node, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(prefix, node)]
    return []


def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"


def _with_ci(h: dict, key: str) -> str:
    if key not in h:
        return "—"
    text = f"{h[key]:.3f}"
    if key + "_ci95_low" in h:
        text += f" ({h[key + '_ci95_low']:.3f}–{h[key + '_ci95_high']:.3f})"
    return text + (f", n={h[key + '_n']}" if key + "_n" in h else "")


def release_blocks(
    gate: dict,
    evaluation: dict,
    csat: dict | None,
    rubric_text: str,
    extras: dict[str, dict],
    images: dict[str, Path],
    retrieval: dict | None = None,
) -> list[tuple]:
    """The release report: decision first, then the evidence a manager needs to trust it."""
    ft, base = gate["finetuned"], gate["base"]
    failing = [r for r in ft if not r["passed"]]
    blocks: list[tuple] = [("h1", "veritune release report")]
    if gate["passed"]:
        blocks.append(
            (
                "p",
                f"**Decision: RELEASE.** The fine-tuned model passes all {len(ft)} release criteria; "
                "the release artifact is in `models/release/` (adapter, release.json, MODEL_CARD.md).",
            )
        )
    else:
        blocks.append(
            (
                "p",
                f"**Decision: BLOCKED.** The fine-tuned model fails {len(failing)} of {len(ft)} release "
                "criteria: " + "; ".join(f"`{r['metric']}`" for r in failing) + ". No release artifact was built.",
            )
        )
    h = evaluation.get("headline", {})
    if "finetuned_rag_f1_unseen" in h:
        # The gate's criteria may be about safety only; the reader must see helpfulness beside the decision.
        blocks.append(
            (
                "p",
                "What the decision does not say on its own: on questions about documents held out of "
                f"training the fine-tuned model reaches token F1 {h['finetuned_rag_f1_unseen']:.2f} "
                f"(base {h.get('base_rag_f1_unseen', float('nan')):.2f}) and wrongly refuses "
                f"{h.get('finetuned_rag_wrong_refusal_answerable', float('nan')):.0%} of answerable questions "
                f"(base {h.get('base_rag_wrong_refusal_answerable', float('nan')):.0%}).",
            )
        )
    base_fail = sum(not r["passed"] for r in base)
    blocks.append(
        ("p", f"For comparison, the untrained base model fails {base_fail} of {len(base)} of the same criteria.")
    )
    blocks.append(
        (
            "table",
            ["criterion", "why it matters", "threshold", "base", "fine-tuned"],
            [
                [
                    f"`{f['metric']}`",
                    f["why"],
                    f"{f['op']} {f['threshold']:g}",
                    f"{_num(b['value'])} {'pass' if b['passed'] else 'FAIL'}",
                    f"{_num(f['value'])} {'pass' if f['passed'] else 'FAIL'}",
                ]
                for f, b in zip(ft, base)
            ],
        )
    )

    blocks += [
        ("h2", "Headline: base vs fine-tuned"),
        (
            "p",
            f"Test split, {evaluation.get('n_test_questions')} questions. Mean over questions with a "
            "bootstrap 95% interval and the number of questions behind it. RAG = the model reads the "
            "passages retrieved for the question; oracle = it reads the question's own documents.",
        ),
        (
            "table",
            ["metric", "higher is better?", "base", "fine-tuned"],
            [
                [label, "yes" if up else "no", _with_ci(h, f"base_{key}"), _with_ci(h, f"finetuned_{key}")]
                for key, label, up in HEADLINE_LABELS
                if f"finetuned_{key}" in h
            ],
        ),
    ]
    if "eval_comparison" in images:
        blocks.append(("img", images["eval_comparison"], "base vs fine-tuned, closed-book vs RAG vs oracle"))

    if retrieval:
        splits = [k for k in ("test", "test_unseen") if isinstance(retrieval.get(k), dict)]
        ks = sorted({int(key.split("@")[1]) for sp in splits for key in retrieval[sp] if key.startswith("recall@")})
        blocks += [
            ("h2", "Retrieval"),
            (
                "p",
                "Share of test questions whose supporting document is among the top k retrieved passages "
                "(`any`), and whose supporting documents all are (`all`, what multi-hop questions need); "
                "from metrics/index.json.",
            ),
            (
                "table",
                ["split", *(f"{w} @{k}" for w in ("any", "all") for k in ks), "MRR", "n"],
                [
                    [
                        sp,
                        *(_num(retrieval[sp].get(f"{pre}recall@{k}")) for pre in ("", "all_") for k in ks),
                        _num(retrieval[sp].get("mrr")),
                        _num(retrieval[sp].get("n")),
                    ]
                    for sp in splits
                ],
            ),
        ]
        if "retrieval_curve" in images:
            blocks.append(("img", images["retrieval_curve"], "retrieval recall@k"))

    rows = []
    for group in (
        "single_hop",
        "multi_hop",
        "answerable_seen",
        "answerable_unseen",
        "unanswerable",
        "unanswerable_false_premise",
        "unanswerable_not_stated",
        "unanswerable_nonexistent_entity",
    ):
        for key in ("em", "f1", "numeric_match", "abstention", "unsupported_rate", "unsupported_rate_when_answering"):
            cells = [
                evaluation.get(v, {}).get(m, {}).get(group, {}).get(key)
                for v in ("base", "finetuned")
                for m in CONTEXT_MODES
            ]
            if any(c is not None for c in cells):
                n = evaluation.get("finetuned", {}).get("rag", {}).get(group, {}).get("n")
                rows.append([f"{group} (n={n})", key] + [_num(c) for c in cells])
    blocks += [
        ("h2", "Accuracy and hallucination by question kind"),
        (
            "p",
            "`abstention` on unanswerable rows is the right answer; on answerable rows it is a wrong refusal. "
            "`unsupported_rate` counts replies whose claims, numbers or entities neither the passages nor "
            "the question support (refusals count as supported); `unsupported_rate_when_answering` is the "
            "same among replies that did not refuse.",
        ),
        ("table", ["group", "metric"] + [f"{v} / {m}" for v in ("base", "finetuned") for m in CONTEXT_MODES], rows),
    ]

    leak = evaluation.get("leakage")
    if leak and "n_sft_examples" in leak:
        blocks += [
            ("h2", "Test data never trained on"),
            (
                "p",
                f"Checked {leak['n_test_questions']} test questions and {leak['n_heldout_docs']} held-out "
                f"documents against {leak['n_sft_examples']} fine-tuning examples (exact normalised match and "
                f"long n-gram overlap): {leak['test_questions_in_sft']} test questions and "
                f"{leak['heldout_docs_in_sft_targets']} held-out documents in training targets. "
                f"{leak['heldout_docs_in_sft_context']} held-out documents appear as unlabelled distractor "
                "passages in fine-tuning prompts (the model is not trained to produce their text, but has "
                "read it); scores on held-out documents should be read with that in mind.",
            ),
        ]

    for variant in ("base", "finetuned"):
        judge = evaluation.get(variant, {}).get("rag", {}).get("judge")
        if judge:
            blocks.append(
                (
                    "p",
                    f"LLM judge ({variant}, RAG, beside the deterministic scores): "
                    + ", ".join(f"{k} {_num(v)}" for k, v in judge.items()),
                )
            )

    if csat:
        blocks += [
            ("h2", "Simulated customer satisfaction"),
            (
                "table",
                ["", "base", "fine-tuned"],
                [
                    [label, *(_num(csat.get(v, {}).get(key)) for v in ("base", "finetuned"))]
                    for label, key in (
                        ("conversations", "n"),
                        ("mean CSAT (1-5)", "csat_mean"),
                        ("95% interval low", "csat_ci95_low"),
                        ("95% interval high", "csat_ci95_high"),
                        ("resolved", "resolution_rate"),
                        ("follow-up only half resolved", "partial_rate"),
                        ("had an answerable question refused", "wrong_refusal_rate"),
                        ("told something unsupported", "misled_rate"),
                        ("mean turns", "mean_turns"),
                        ("mean turns to resolution", "mean_turns_to_resolution"),
                    )
                ]
                + [
                    [
                        f"CSAT = {k}",
                        *(str(csat.get(v, {}).get("distribution", {}).get(str(k), "—")) for v in ("base", "finetuned")),
                    ]
                    for k in range(1, 6)
                ]
                + [
                    [
                        f"mean CSAT, {p} customers",
                        *(
                            _num(csat.get(v, {}).get("by_persona", {}).get(p, {}).get("csat_mean"))
                            for v in ("base", "finetuned")
                        ),
                    ]
                    for p in sorted(csat.get("finetuned", {}).get("by_persona", {}))
                ],
            ),
        ]
        if "csat_histogram" in images:
            blocks.append(("img", images["csat_histogram"], "CSAT distribution"))
        blocks.append(("p", rubric_text))

    agent = extras.get("agent.json")
    if agent and "claimed_undone_rate" in agent.get("finetuned", {}):
        blocks += [
            ("h2", "Agent: actions claimed but not taken"),
            (
                "p",
                "Share of tool-using episodes whose final answer claims a refund, a ticket or a cancellation "
                "that the episode's own writes do not show (a hallucination about the world), beside the "
                "share that wrote although the customer asked for nothing; from metrics/agent.json.",
            ),
            (
                "table",
                ["", "base", "fine-tuned"],
                [
                    [label, *(_num(agent.get(v, {}).get(key)) for v in ("base", "finetuned"))]
                    for label, key in (
                        ("episodes", "episodes"),
                        ("success", "success"),
                        ("claimed but not done", "claimed_undone_rate"),
                        ("unrequested write attempted", "unsafe_action_rate"),
                    )
                ],
            ),
        ]
    for name, metrics in extras.items():
        flat = _flatten(metrics)
        blocks += [("h2", f"{name}"), ("table", ["metric", "value"], [[k, _num(v)] for k, v in flat[:80]])]
        if len(flat) > 80:
            blocks.append(("p", f"({len(flat) - 80} more values in metrics/{name}.)"))
        for key, path in images.items():
            if key.startswith(f"{Path(name).stem}/"):
                blocks.append(("img", path, key))
    blocks += [
        ("h2", "Reproduce"),
        (
            "p",
            "`dvc repro` (or `python stages/evaluate.py`, `stages/csat.py`, `stages/gate.py`); numbers in "
            "metrics/eval.json, metrics/csat.json, metrics/gate.json; thresholds in params.yaml `gate`.",
        ),
    ]
    return blocks


def render_markdown(blocks: Sequence[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append(
                "\n".join(
                    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                    + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
                )
            )
        elif kind == "img":
            out.append(f"![{block[2]}]({Path(block[1]).name})")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def render_html(blocks: Sequence[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_release_report(blocks: Sequence[tuple], out_dir: Path) -> None:
    """report.md with its PNGs beside it, and report.html with them inlined."""
    for block in blocks:
        if block[0] == "img" and Path(block[1]).resolve().parent != out_dir.resolve():
            shutil.copy2(block[1], out_dir / Path(block[1]).name)
    (out_dir / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(blocks, "veritune release report"), encoding="utf-8")


def plot_retrieval_curve(retrieval: dict, path: Path) -> None:
    """recall@k against k for the test split and its held-out documents (metrics/index.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split in ("test", "test_unseen"):
        if not isinstance(retrieval.get(split), dict):
            continue
        for prefix, style, label in (("", "-o", "any supporting doc"), ("all_", "--s", "all supporting docs")):
            points = sorted(
                (int(k.split("@")[1]), v) for k, v in retrieval[split].items() if k.startswith(f"{prefix}recall@")
            )
            if points:
                ax.plot(*zip(*points), style, label=f"{split}: {label}")
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.set_title("Retrieval: supporting documents in the top k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
