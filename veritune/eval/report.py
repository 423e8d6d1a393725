"""The evaluation report a reader takes in at a glance (`reports/eval/eval.md`: a table and one
comparison plot); the release report is `veritune.eval.release_report`."""

from __future__ import annotations

from pathlib import Path

from veritune.eval.evaluation import CONTEXT_MODES

ROWS = [
    ("Answerable, documents held out of training: token F1", "answerable_unseen", "f1"),
    ("Answerable, documents seen in training: token F1", "answerable_seen", "f1"),
    ("Answerable: exact match", "answerable", "em"),
    ("Multi-hop: token F1", "multi_hop", "f1"),
    ("Unanswerable: abstention (1 - hallucination rate)", "unanswerable", "abstention"),
    ("False-premise questions: abstention", "unanswerable_false_premise", "abstention"),
    ("Answerable: numeric match", "answerable", "numeric_match"),
    ("Answerable: wrongly abstained", "answerable", "abstention"),
    ("Answers with claims the passages do not support (lower is better)", "all", "unsupported_rate"),
    ("... of the answers that did not abstain (lower is better)", "all", "unsupported_rate_when_answering"),
]


def _value(metrics: dict, variant: str, mode: str, group: str, key: str) -> float | None:
    return metrics.get(variant, {}).get(mode, {}).get(group, {}).get(key)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def write_eval_report(metrics: dict, out_dir: Path) -> None:
    columns = [(v, m) for v in ("base", "finetuned") for m in CONTEXT_MODES]
    lines = [
        "# Evaluation report",
        "",
        f"Test questions: {metrics.get('n_test_questions')}. Scores are means over questions (0-1, higher is "
        "better, except *wrongly abstained* and the unsupported shares). RAG = the model reads the passages "
        "retrieved from the index; oracle = it reads the question's own supporting documents (unanswerable "
        "questions: the related documents that lack the answer, or the retrieved passages when the product "
        "does not exist).",
        "",
        "| metric | " + " | ".join(f"{v} / {m.replace('_', '-')}" for v, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, group, key in ROWS:
        cells = [_fmt(_value(metrics, v, m, group, key)) for v, m in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ft = metrics.get("finetuned", {}).get("rag", {})
    for group, key in (("answerable_unseen", "f1"), ("unanswerable", "abstention")):
        g = ft.get(group, {})
        if f"{key}_ci95_low" in g:
            lines.append("")
            lines.append(
                f"Fine-tuned RAG, {group} {key}: {g[key]:.3f} (95% bootstrap interval "
                f"{g[f'{key}_ci95_low']:.3f}-{g[f'{key}_ci95_high']:.3f}, n={g['n']})."
            )
    lines += ["", "![base vs fine-tuned](eval_comparison.png)", ""]
    (out_dir / "eval.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(metrics, out_dir / "eval_comparison.png")


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        "F1 unseen docs",
        "F1 seen docs",
        "multi-hop F1",
        "abstention\n(unanswerable)",
        "wrongly abstained\n(answerable; lower\nis better)",
        "unsupported claims\n(answerable; lower\nis better)",
    ]
    keys = [
        ("answerable_unseen", "f1"),
        ("answerable_seen", "f1"),
        ("multi_hop", "f1"),
        ("unanswerable", "abstention"),
        ("answerable", "abstention"),
        ("answerable", "unsupported_rate"),
    ]
    fig, ax = plt.subplots(figsize=(10, 4))
    pairs = [(v, m) for v in ("base", "finetuned") for m in CONTEXT_MODES]
    width = 0.8 / len(pairs)
    for i, (variant, mode) in enumerate(pairs):
        # No bar (not a zero bar) where a metric does not apply: closed-book has no passages to be unsupported by.
        values = [_value(metrics, variant, mode, g, k) for g, k in keys]
        values = [float("nan") if v is None else v for v in values]
        ax.bar(
            [x + (i - (len(pairs) - 1) / 2) * width for x in range(len(keys))],
            values,
            width,
            label=f"{variant} / {mode}",
        )
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Base vs fine-tuned, closed-book vs RAG vs oracle context (test split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- release report
# One list of blocks renders to both Markdown (images beside it) and self-contained HTML
# (images inlined as base64), so the two never disagree.
