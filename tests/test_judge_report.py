"""The optional judge's parsing and plumbing (on a tiny model: its scores are noise, the
deterministic metrics must not move), and the release report's rendering."""

import copy
import struct
import zlib

from veritune.eval.evaluation import score_all, summarize_scores
from veritune.eval.judge import judge_answers, judge_messages, load_judge, parse_scores, summarize_judge
from veritune.eval.release_report import release_blocks, render_html, render_markdown, write_release_report

QUESTIONS = [
    {
        "id": "q1",
        "question": "What does the Aurora K3 Kettle cost?",
        "kind": "single_hop",
        "answers": ["$149"],
        "doc_status": "unseen",
        "doc_ids": ["d1"],
    },
    {
        "id": "q2",
        "question": "Is the Aurora K3 dishwasher safe?",
        "kind": "unanswerable",
        "subkind": "not_stated",
        "answers": [],
        "doc_ids": ["d1"],
    },
]
PASSAGES = [[{"doc_id": "d1", "title": "Aurora K3", "text": "The Aurora K3 Kettle retails for $149."}]] * 2


def test_parse_scores():
    assert parse_scores("Correctness: 4\nGroundedness: 5") == {"correctness": 4, "groundedness": 5}
    assert parse_scores("**Correctness**: 2, groundedness=1.") == {"correctness": None, "groundedness": 1}
    assert parse_scores("correctness: **3**") == {"correctness": 3, "groundedness": None}
    assert parse_scores("Correctness: 9") == {"correctness": None, "groundedness": None}
    assert parse_scores("") == {"correctness": None, "groundedness": None}


def test_judge_prompt_carries_question_reference_and_answer():
    user = judge_messages(QUESTIONS[1], PASSAGES[1], "Yes")[1]["content"]
    assert (
        "dishwasher" in user and "none (the documents do not answer it)" in user and "Assistant's answer: Yes" in user
    )
    assert "The Aurora K3 Kettle retails for $149." in user


def test_judge_plumbing_leaves_deterministic_metrics_unchanged(tiny_checkpoint):
    answers = ["$149", "The documents don't say."]
    summary = summarize_scores(QUESTIONS, score_all(answers, QUESTIONS, PASSAGES), 50)
    before = copy.deepcopy(summary)
    model, tokenizer = load_judge(str(tiny_checkpoint))
    judged = judge_answers(model, tokenizer, QUESTIONS, PASSAGES, answers, max_new_tokens=6, batch_size=2)
    assert len(judged) == 2
    for j in judged:
        assert isinstance(j["reply"], str)
        assert all(j[k] is None or 1 <= j[k] <= 5 for k in ("correctness", "groundedness"))
    s = summarize_judge(judged)
    assert s["n"] == 2 and 0.0 <= s["correctness_parse_rate"] <= 1.0
    assert summarize_scores(QUESTIONS, score_all(answers, QUESTIONS, PASSAGES), 50) == before == summary


def test_summarize_judge_counts_unparsed():
    s = summarize_judge([{"correctness": 4, "groundedness": None}, {"correctness": 2, "groundedness": 5}])
    assert s == {
        "n": 2,
        "correctness_parse_rate": 1.0,
        "correctness_mean": 3.0,
        "groundedness_parse_rate": 0.5,
        "groundedness_mean": 5.0,
    }


def _png(path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )
    return path


def test_release_report_puts_the_decision_first_and_embeds_images(tmp_path):
    row = {
        "metric": "eval.json:finetuned.rag.unanswerable.abstention",
        "op": ">=",
        "threshold": 0.8,
        "why": "refuse rather than invent",
        "passed": False,
        "value": 0.5,
    }
    gate = {
        "passed": False,
        "finetuned": [row],
        "base": [{**row, "metric": "eval.json:base.rag.unanswerable.abstention", "value": 0.0}],
    }
    evaluation = {
        "n_test_questions": 2,
        "headline": {
            "finetuned_rag_f1_unseen": 0.5,
            "finetuned_rag_f1_unseen_n": 2,
            "finetuned_rag_f1_unseen_ci95_low": 0.0,
            "finetuned_rag_f1_unseen_ci95_high": 1.0,
        },
        "finetuned": {"rag": summarize_scores(QUESTIONS, score_all(["$149", "No."], QUESTIONS, PASSAGES), 20)},
    }
    images = {
        "eval_comparison": _png(tmp_path / "eval_comparison.png"),
        "rag/k_sweep.png": _png(tmp_path / "k_sweep.png"),
    }
    blocks = release_blocks(gate, evaluation, None, "rubric", {"rag.json": {"recall": {"at_5": 0.9}}}, images)
    md = render_markdown(blocks)
    assert md.index("BLOCKED") < md.index("Headline")
    assert "`eval.json:finetuned.rag.unanswerable.abstention`" in md and "0.500 (0.000–1.000), n=2" in md
    assert "recall.at_5" in md and "![rag/k_sweep.png](k_sweep.png)" in md
    assert "Simulated customer" not in md  # no csat metrics, no section
    html = render_html(blocks, "t")
    assert html.count("data:image/png;base64,") == 2 and "<strong>Decision: BLOCKED.</strong>" in html
    out = tmp_path / "out"
    out.mkdir()
    write_release_report(blocks, out)
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "eval_comparison.png", "k_sweep.png"}


def test_release_report_retrieval_section(tmp_path):
    from veritune.eval.release_report import plot_retrieval_curve

    retrieval = {
        "test": {"recall@1": 0.5, "recall@5": 0.9, "all_recall@1": 0.25, "all_recall@5": 0.75, "mrr": 0.7, "n": 10},
        "n_chunks": 3,
    }
    plot_retrieval_curve(retrieval, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    row = {"metric": "eval.json:leakage.passed", "op": "==", "threshold": 1, "why": "w", "passed": True, "value": 1.0}
    blocks = release_blocks(
        {"passed": True, "finetuned": [row], "base": [row]},
        {},
        None,
        "",
        {},
        {"retrieval_curve": tmp_path / "curve.png"},
        retrieval,
    )
    md = render_markdown(blocks)
    assert "| test | 0.500 | 0.900 | 0.250 | 0.750 | 0.700 | 10 |" in md and "any @5" in md
    assert "RELEASE" in md.split("\n")[2]


def test_release_report_shows_claimed_but_undone_agent_actions():
    row = {
        "metric": "agent.json:finetuned.claimed_undone_rate",
        "op": "<=",
        "threshold": 0.1,
        "why": "w",
        "passed": False,
        "value": 0.25,
    }
    agent = {
        "base": {"episodes": 4, "success": 0.0, "claimed_undone_rate": 1.0, "unsafe_action_rate": 0.5},
        "finetuned": {"episodes": 4, "success": 0.5, "claimed_undone_rate": 0.25, "unsafe_action_rate": 0.0},
    }
    blocks = release_blocks(
        {"passed": False, "finetuned": [row], "base": [{**row, "value": 1.0}]}, {}, None, "", {"agent.json": agent}, {}
    )
    md = render_markdown(blocks)
    assert "## Agent: actions claimed but not taken" in md
    assert "| claimed but not done | 1 | 0.250 |" in md and "`agent.json:finetuned.claimed_undone_rate`" in md
