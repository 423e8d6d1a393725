"""The evaluation report a reader takes in at a glance: a table and one comparison plot."""

from __future__ import annotations

from pathlib import Path

ROWS = [
    ("Answerable, documents held out of training: token F1", "answerable_unseen", "f1"),
    ("Answerable, documents seen in training: token F1", "answerable_seen", "f1"),
    ("Answerable: exact match", "answerable", "em"),
    ("Multi-hop: token F1", "multi_hop", "f1"),
    ("Unanswerable: abstention (1 - hallucination rate)", "unanswerable", "abstention"),
    ("Answerable: wrongly abstained", "answerable", "abstention"),
    ("Answers with claims the passages do not support (RAG; lower is better)", "all", "unsupported_rate"),
]


def _value(metrics: dict, variant: str, mode: str, group: str, key: str) -> float | None:
    return metrics.get(variant, {}).get(mode, {}).get(group, {}).get(key)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def write_eval_report(metrics: dict, out_dir: Path) -> None:
    columns = [(v, m) for v in ("base", "finetuned") for m in ("closed_book", "rag")]
    lines = [
        "# Evaluation report",
        "",
        f"Test questions: {metrics.get('n_test_questions')}. Scores are means over questions (0-1, higher is "
        "better, except *wrongly abstained*). RAG = the model reads the passages retrieved from the index.",
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
            lines.append(f"Fine-tuned RAG, {group} {key}: {g[key]:.3f} (95% bootstrap interval "
                         f"{g[f'{key}_ci95_low']:.3f}-{g[f'{key}_ci95_high']:.3f}, n={g['n']}).")
    lines += ["", "![base vs fine-tuned](eval_comparison.png)", ""]
    (out_dir / "eval.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(metrics, out_dir / "eval_comparison.png")


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["F1 unseen docs", "F1 seen docs", "multi-hop F1", "abstention\n(unanswerable)",
              "wrongly abstained\n(answerable; lower\nis better)"]
    keys = [("answerable_unseen", "f1"), ("answerable_seen", "f1"), ("multi_hop", "f1"), ("unanswerable", "abstention"),
            ("answerable", "abstention")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, (variant, mode) in enumerate([(v, m) for v in ("base", "finetuned") for m in ("closed_book", "rag")]):
        values = [_value(metrics, variant, mode, g, k) or 0.0 for g, k in keys]
        ax.bar([x + (i - 1.5) * width for x in range(len(keys))], values, width, label=f"{variant} / {mode}")
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Base vs fine-tuned, closed-book vs RAG (test split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
