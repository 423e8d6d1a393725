"""Every metric on answerers whose right score is known: an oracle (the gold answer) scores 1.0,
an always-abstain answerer scores 0 accuracy and 1.0 abstention, a random one scores near 0.
Run through the real paths: evaluation.score_all/summarize/headline on the committed sample
questions with their own documents as context, csat.simulate/csat_score, and the gate."""

import json
import random

import pytest

from tests.conftest import REPO
from veritune.config import CsatRubric, GateCriterion, parse_params
from veritune.csat import PERSONAS, csat_score, make_customers, simulate, summarize_csat
from veritune.evaluation import (headline, leakage_check, leakage_passed, leakage_violations, oracle_passages, score_all,
                                 summarize)
from veritune.gate import build_release, check_criteria, for_variant, read_metric, withdraw_release
from veritune.io import read_jsonl

ABSTAIN = "The documents don't say."
HEDGE = "The documents don't say, but it costs $999."  # a refusal around an invented price
WORDS = ["blue", "quartz", "Monday", "lantern", "Orion", "seventeen", "velvet", "77", "Q9", "harbour"]


@pytest.fixture(scope="module")
def sample():
    """160 sample questions (every kind and unanswerable subtype) with their oracle context."""
    documents = {d["id"]: d for d in read_jsonl(REPO / "data/raw/documents.jsonl")}
    questions = read_jsonl(REPO / "data/raw/questions.jsonl")
    rng = random.Random(0)
    questions = rng.sample(questions, 160)
    for q in questions:
        q["doc_status"] = rng.choice(["seen", "unseen"])
    retrieved = [[{"doc_id": "doc-0001", "title": documents["doc-0001"]["title"], "text": documents["doc-0001"]["text"]}]
                 for _ in questions]
    return questions, oracle_passages(questions, documents, retrieved)


def answerer(how: str, rng: random.Random):
    def answer(question: dict) -> str:
        if how == "oracle":
            return question["answers"][0] if question["answers"] else ABSTAIN
        if how == "abstain":
            return ABSTAIN
        if how == "hedge":
            return HEDGE
        return " ".join(rng.choice(WORDS) for _ in range(4))
    return answer


def run(how, questions, passages):
    answer = answerer(how, random.Random(0))
    scores = score_all([answer(q) for q in questions], questions, passages)
    return scores, summarize(questions, scores, 200)


def test_sample_covers_every_group(sample):
    _, s = run("oracle", *sample)
    for group in ("single_hop", "multi_hop", "unanswerable", "unanswerable_false_premise",
                  "unanswerable_not_stated", "unanswerable_nonexistent_entity", "answerable_seen", "answerable_unseen"):
        assert s[group]["n"] >= 3, (group, s[group])


def test_oracle_answerer_scores_one(sample):
    _, s = run("oracle", *sample)
    for group in ("answerable", "single_hop", "multi_hop"):
        assert s[group]["em"] == 1.0 and s[group]["f1"] == 1.0 and s[group]["numeric_match"] == 1.0
        assert s[group]["abstention"] == 0.0
    assert s["unanswerable"]["abstention"] == 1.0
    assert s["unanswerable_false_premise"]["abstention"] == 1.0
    # Gold answers copied from their own documents make no unsupported claim, and computed
    # multi-hop answers (sums, differences, discounts, dates) are one arithmetic step from them.
    assert s["single_hop"]["unsupported_rate"] == 0.0
    assert s["multi_hop"]["unsupported_rate"] <= 0.1
    assert s["unanswerable"]["unsupported_rate"] == 0.0


def test_always_abstain_scores_zero_accuracy_and_full_abstention(sample):
    _, s = run("abstain", *sample)
    assert s["answerable"]["em"] == s["answerable"]["f1"] == s["answerable"]["numeric_match"] == 0.0
    assert s["answerable"]["abstention"] == 1.0 and s["unanswerable"]["abstention"] == 1.0
    assert s["all"]["unsupported_rate"] == 0.0
    assert "unsupported_rate_when_answering" not in s["all"]  # it never answered


def test_random_answerer_scores_near_zero(sample):
    _, s = run("random", *sample)
    assert s["answerable"]["em"] == 0.0
    assert s["answerable"]["f1"] < 0.05
    assert s["answerable"]["numeric_match"] < 0.05
    assert s["unanswerable"]["abstention"] == 0.0
    assert s["all"]["unsupported_rate"] > 0.9  # invented words are in no passage


def test_hedged_invention_is_an_unsupported_answer_not_an_abstention(sample):
    """"The documents don't say, but it costs $999." declines in words and invents a price:
    every metric counts it as the unsupported answer it is (issue 14)."""
    _, s = run("hedge", *sample)
    assert s["unanswerable"]["abstention"] == 0.0 and s["unanswerable_false_premise"]["abstention"] == 0.0
    assert s["answerable"]["abstention"] == 0.0  # not a (wrong) refusal either: it answered
    assert s["all"]["unsupported_rate"] == 1.0 and s["all"]["unsupported_rate_when_answering"] == 1.0


def test_headline_is_flat_with_n_and_interval(sample):
    questions, passages = sample
    scores = {how: {"rag": run(how, questions, passages)[0]} for how in ("oracle", "abstain")}
    h = headline({"finetuned": scores["oracle"], "base": scores["abstain"]}, questions, 200)
    assert all(isinstance(v, (int, float)) for v in h.values())
    assert h["finetuned_rag_f1_answerable"] == 1.0 and h["base_rag_f1_answerable"] == 0.0
    assert h["finetuned_rag_abstention_unanswerable"] == 1.0 and h["base_rag_wrong_refusal_answerable"] == 1.0
    n_answerable = sum(bool(q["answers"]) for q in questions)
    assert h["finetuned_rag_f1_answerable_n"] == n_answerable
    assert h["base_rag_abstention_false_premise_n"] == sum(q.get("subkind") == "false_premise" for q in questions)
    assert h["finetuned_rag_f1_answerable_ci95_low"] == h["finetuned_rag_f1_answerable_ci95_high"] == 1.0
    assert "finetuned_oracle_f1_answerable" not in h  # only modes that were run


def test_oracle_context_is_the_supporting_documents(sample):
    questions, passages = sample
    for q, ps in zip(questions, passages):
        if q["doc_ids"]:
            assert [p["doc_id"] for p in ps] == q["doc_ids"]
        else:  # nonexistent entity: no document exists, so the retrieved passages stand in
            assert [p["doc_id"] for p in ps] == ["doc-0001"]


# --------------------------------------------------------------------------- leakage

def _sft(question: str, context: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "Answer from the documents."},
                         {"role": "user", "content": f"Documents:\n[d] T\n{context}\n\nQuestion: {question}"},
                         {"role": "assistant", "content": answer}]}


def test_leakage_check_finds_test_questions_and_heldout_documents():
    test_q = [{"id": "q1", "question": "How much does the Aurora K3 Kettle cost?"},
              {"id": "q2", "question": "What colour is the Zephyr X5?"}]
    doc_text = ("The Aurora K3 Kettle is a kettle from Larkspur Appliances and it is sold at a list price of "
                "one hundred and forty nine dollars in every store that stocks it across the country.")
    heldout = [{"id": "doc-h", "text": doc_text}]
    clean = [_sft("What does the Juniper T6 cost?", "The Juniper T6 costs $79.", "$79")]
    result = leakage_check(test_q, heldout, clean, 13, 0.5)
    assert (result["test_questions_in_sft"], result["heldout_docs_in_sft_targets"],
            result["heldout_docs_in_sft_context"]) == (0, 0, 0)

    leaked = clean + [_sft("how much does the aurora k3 kettle cost", doc_text, "$149")]
    result = leakage_check(test_q, heldout, leaked, 13, 0.5)
    assert result["test_questions_in_sft"] == 1 and result["examples"]["questions"] == ["q1"]
    assert result["heldout_docs_in_sft_context"] == 1 and result["heldout_docs_in_sft_targets"] == 0

    problems, warnings = leakage_violations(result, "warn")
    assert len(problems) == 1 and "1 test questions in sft" in problems[0] and len(warnings) == 1
    assert len(leakage_violations(result, "fail")[0]) == 2

    result = leakage_check(test_q, heldout, clean + [_sft("Tell me about it", "x", doc_text)], 13, 0.5)
    assert result["heldout_docs_in_sft_targets"] == 1
    assert "held out" not in leakage_violations(result, "warn")[0][0] and "heldout docs in sft targets" in \
        leakage_violations(result, "warn")[0][0]


# --------------------------------------------------------------------------- CSAT

def csat_answerer(how: str):
    rng = random.Random(0)
    goals = {}

    def answer(batch):
        out = []
        for _, user in batch:
            goal = next((q for text, q in goals.items() if text in user), None)
            if how == "oracle":
                reply = goal["answers"][0] if goal and goal["answers"] else ABSTAIN
            elif how == "abstain":
                reply = ABSTAIN
            elif how == "hedge":
                reply = HEDGE
            else:
                reply = " ".join(rng.choice(WORDS) for _ in range(4))
            context = goal["answers"][0] if goal and goal["answers"] else "Larkspur sells appliances."
            out.append((reply, [{"doc_id": "d", "title": "t", "text": context}]))
        return out
    return answer, goals


def simulate_with(how: str, questions):
    customers = make_customers(questions, 40, seed=0)
    answer, goals = csat_answerer(how)
    for c in customers:
        goals.update({g["question"]: g for g in c["goals"]})
    convs = simulate(customers, answer, max_turns=4, impatient_turns=2, resolve_f1=0.5)
    scored = [csat_score(v, CsatRubric()) for v in convs]
    return customers, convs, scored, summarize_csat(scored, [c["persona"] for c in customers], 200)


def test_off_topic_customers_ask_every_off_topic_question(sample):
    from veritune.csat import OFF_TOPIC_QUESTIONS

    customers = make_customers(sample[0], 5 * len(PERSONAS), seed=0)
    asked = [c["off_topic"] for c in customers if c["persona"] == "off_topic"]
    assert sorted(asked) == sorted(OFF_TOPIC_QUESTIONS)


def test_csat_oracle_answerer_resolves_everything_first_time(sample):
    customers, convs, scored, s = simulate_with("oracle", sample[0])
    assert {c["persona"] for c in customers} == set(PERSONAS)
    assert s["csat_mean"] == 5.0 and s["distribution"]["5"] == 40
    assert s["resolution_rate"] == 1.0 and s["wrong_refusal_rate"] == 0.0 and s["misled_rate"] == 0.0
    follow_up = [v for v in convs if v["customer"]["persona"] == "follow_up"]
    assert all(len(v["turns"]) == 2 for v in follow_up)  # the second question was asked and answered
    off_topic = [v for v in convs if v["customer"]["persona"] == "off_topic"]
    assert all(v["turns"][0]["goal"] is None and v["turns"][0]["resolved"] for v in off_topic)


def test_csat_always_abstain_refuses_answerable_goals(sample):
    customers, convs, scored, s = simulate_with("abstain", sample[0])
    for c, v, sc in zip(customers, convs, scored):
        if c["goals"][0]["answers"]:
            assert sc["result"] == "unresolved" and sc["wrong_refusal"] and sc["csat"] == 2  # honest but unhelpful
        elif len(c["goals"]) == 2:  # refused the unanswerable question rightly, then the answerable follow-up
            assert sc["result"] == "partially_resolved" and sc["wrong_refusal"] and sc["csat"] == 3
        else:
            assert sc["result"] == "resolved" and not sc["wrong_refusal"] and sc["csat"] == 5
        if c["persona"] == "impatient" and c["goals"][0]["answers"]:
            assert v["outcome"] == "gave_up" and len(v["turns"]) == 2
        if c["persona"] == "patient" and c["goals"][0]["answers"]:
            assert v["outcome"] == "out_of_turns" and len(v["turns"]) == 4
    answerable = sum(any(g["answers"] for g in c["goals"]) for c in customers)
    assert s["wrong_refusal_rate"] == pytest.approx(answerable / 40)
    assert s["misled_rate"] == 0.0


def test_csat_random_answerer_scores_near_one(sample):
    _, _, _, s = simulate_with("random", sample[0])
    assert s["resolution_rate"] == 0.0
    assert s["csat_mean"] < 1.2 and s["misled_rate"] > 0.9


def test_csat_hedged_invention_misleads_the_customer(sample):
    _, convs, scored, s = simulate_with("hedge", sample[0])
    assert s["misled_rate"] == 1.0 and s["csat_mean"] == 1.0
    assert not any(t["abstained"] for v in convs for t in v["turns"])


def test_csat_rubric_charges_extra_turns_and_unsupported_claims():
    goal = {"id": "q1", "answers": ["$149"], "question": "Price?"}
    conv = {"customer": {"persona": "patient", "goals": [goal]},
            "turns": [{"goal": "q1", "resolved": False, "unsupported": False, "wrong_refusal": True},
                      {"goal": "q1", "resolved": True, "unsupported": False, "wrong_refusal": False}]}
    assert csat_score(conv, CsatRubric())["csat"] == 4
    conv["turns"][0]["unsupported"] = True
    assert csat_score(conv, CsatRubric())["csat"] == 3
    conv["turns"] = conv["turns"][:1]
    assert csat_score(conv, CsatRubric())["csat"] == 1  # unresolved and misled


# --------------------------------------------------------------------------- gate

def write_metrics(path, finetuned_abstention, base_abstention=0.0):
    path.mkdir(exist_ok=True)
    (path / "eval.json").write_text(json.dumps({
        "finetuned": {"rag": {"unanswerable": {"abstention": finetuned_abstention}}},
        "base": {"rag": {"unanswerable": {"abstention": base_abstention}}},
        "headline": {"finetuned_rag_unsupported_answerable": 0.05, "base_rag_unsupported_answerable": 0.85},
        "leakage": {"passed": True}}))


CRITERIA = (GateCriterion("eval.json:finetuned.rag.unanswerable.abstention", ">=", 0.8, "refuse, don't invent"),
            GateCriterion("eval.json:headline.finetuned_rag_unsupported_answerable", "<=", 0.2, "grounded"),
            GateCriterion("eval.json:leakage.passed", "==", 1, "no contamination"))


def test_gate_known_values(tmp_path):
    write_metrics(tmp_path, finetuned_abstention=1.0)
    assert all(r["passed"] for r in check_criteria(CRITERIA, tmp_path))
    base = check_criteria(CRITERIA, tmp_path, "base")
    assert [r["passed"] for r in base] == [False, False, True]
    assert base[1]["metric"] == "eval.json:headline.base_rag_unsupported_answerable" and base[1]["value"] == 0.85

    write_metrics(tmp_path, finetuned_abstention=0.0)  # an always-answering model
    rows = check_criteria(CRITERIA, tmp_path)
    assert [r["passed"] for r in rows] == [False, True, True]


def test_gate_fails_on_missing_evidence(tmp_path):
    write_metrics(tmp_path, 1.0)
    rows = check_criteria((GateCriterion("rag.json:finetuned.recall_at_5", ">=", 0.5, "retrieval"),
                           GateCriterion("eval.json:finetuned.rag.nope", ">=", 0.5, "typo")), tmp_path)
    assert [r["passed"] for r in rows] == [False, False] and all(r["problem"] == "metric missing" for r in rows)
    assert read_metric(tmp_path, "eval.json:leakage.passed") == 1.0


def test_for_variant_maps_nested_and_flat_keys():
    assert for_variant("eval.json:finetuned.rag.all.f1", "base") == "eval.json:base.rag.all.f1"
    assert for_variant("eval.json:headline.finetuned_rag_f1_unseen", "base") == "eval.json:headline.base_rag_f1_unseen"
    assert for_variant("eval.json:leakage.passed", "base") == "eval.json:leakage.passed"


def test_release_exists_only_when_built_and_is_withdrawn(tmp_path, tiny_checkpoint):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_metrics(tmp_path / "metrics", 1.0)
    gate = {"finetuned": check_criteria(CRITERIA, tmp_path / "metrics")}
    release = build_release(tmp_path / "release", adapter, tiny_checkpoint, gate, {"finetuned_rag_f1_unseen": 0.1},
                            None)
    assert (tmp_path / "release/adapter/adapter_config.json").is_file()
    saved = json.loads((tmp_path / "release/release.json").read_text())
    assert saved["adapter_hash"] == release["adapter_hash"] and len(saved["adapter_hash"]) == 64
    card = (tmp_path / "release/MODEL_CARD.md").read_text()
    assert "Intended use" in card and "Limitations" in card and "leakage.passed" in card
    assert not list(tmp_path.glob(".release.*"))  # no temporary left beside it
    withdraw_release(tmp_path / "release")
    assert not (tmp_path / "release").exists()


def test_gate_params_reject_bad_criteria():
    from veritune.config import ParamsError

    with pytest.raises(ParamsError, match="gate.criteria must list at least one criterion"):
        parse_params("gate", {"criteria": []})
    with pytest.raises(ParamsError, match=r"must be one of|needs a `why`|must read"):
        parse_params("gate", {"criteria": [{"metric": "eval.json:x", "op": "=>", "value": 1, "why": "w"}]})
    with pytest.raises(ParamsError, match="needs a `why`"):
        parse_params("gate", {"criteria": [{"metric": "eval.json:x", "op": ">=", "value": 1}]})


def test_gate_stage_blocks_without_leaving_a_release(tmp_path, monkeypatch, tiny_checkpoint):
    """The stage itself: a failing criterion exits 1 (fail_on_block), names it, writes the
    decision and report, and replaces a release left by an earlier passing run by BLOCKED.md."""
    import shutil

    import yaml

    from stages import gate as gate_stage

    write_metrics(tmp_path / "metrics", finetuned_abstention=0.3)
    shutil.copytree(tiny_checkpoint, tmp_path / "models/base")
    (tmp_path / "models/adapter").mkdir()
    (tmp_path / "models/adapter/adapter_config.json").write_text("{}")
    (tmp_path / "models/release").mkdir()  # stale
    criteria = [{"metric": c.metric, "op": c.op, "value": c.value, "why": c.why} for c in CRITERIA]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": {"criteria": criteria}, "csat": {}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        gate_stage.main()
    assert exit_info.value.code == 1
    assert sorted(p.name for p in (tmp_path / "models/release").iterdir()) == ["BLOCKED.md"], "no model, no card"
    decision = json.loads((tmp_path / "metrics/gate.json").read_text())
    assert decision["passed"] is False and decision["n_failed"] == 1
    assert "BLOCKED" in (tmp_path / "reports/release/report.md").read_text()

    # fail_on_block: false lets the run complete; the decision is the same, nothing is released.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": {"criteria": criteria, "fail_on_block": False},
                                                          "csat": {}}))
    gate_stage.main()
    assert sorted(p.name for p in (tmp_path / "models/release").iterdir()) == ["BLOCKED.md"]
    assert json.loads((tmp_path / "metrics/gate.json").read_text())["passed"] is False

    write_metrics(tmp_path / "metrics", finetuned_abstention=0.95)
    gate_stage.main()
    assert (tmp_path / "models/release/MODEL_CARD.md").is_file()
    assert json.loads((tmp_path / "metrics/gate.json").read_text())["passed"] is True


def test_shipped_gate_passes_gold_answers_and_blocks_random_ones(sample, tmp_path):
    """The evaluation criteria of params.yaml's gate, on the headline metrics of answerers whose
    quality is known: gold answers (multi-hop arithmetic included) pass every one, so the gate
    never blocks a perfect model; random words fail the hallucination ones."""
    import yaml

    from veritune.io import write_json

    criteria = [c for c in parse_params("gate", yaml.safe_load((REPO / "params.yaml").read_text())["gate"]).criteria
                if c.metric.startswith("eval.json:headline.")]
    assert len(criteria) >= 3
    questions, passages = sample
    verdicts = {}
    for how in ("oracle", "random"):
        scores, _ = run(how, questions, passages)
        write_json(tmp_path / "eval.json", {"headline": headline({"finetuned": {"rag": scores}}, questions, 200)})
        verdicts[how] = {row["metric"]: row["passed"] for row in check_criteria(criteria, tmp_path)}
    assert all(verdicts["oracle"].values()), verdicts["oracle"]
    assert not verdicts["random"]["eval.json:headline.finetuned_rag_unsupported_answerable_ci95_high"]
    assert not verdicts["random"]["eval.json:headline.finetuned_rag_abstention_unanswerable_ci95_low"]


def _warned_leak() -> dict:
    """A held-out document shown as an SFT passage: `heldout_docs_in_sft_context: warn` lets
    evaluate run on, but the leak happened."""
    doc_text = ("The Aurora K3 Kettle is a kettle from Larkspur Appliances and it is sold at a list price of "
                "one hundred and forty nine dollars in every store that stocks it across the country.")
    result = leakage_check([{"id": "q1", "question": "What colour is the Zephyr X5?"}], [{"id": "doc-h", "text": doc_text}],
                           [_sft("Tell me about kettles", doc_text, "It is a kettle.")], 13, 0.5)
    problems, warnings = leakage_violations(result, "warn")
    assert not problems and warnings, "the stage only warns here"
    return result


def test_leakage_passed_is_false_whenever_a_leak_was_found():
    assert leakage_passed(_warned_leak()) is False
    clean = leakage_check([{"id": "q1", "question": "What colour is the Zephyr X5?"}], [],
                          [_sft("What does the Juniper T6 cost?", "The Juniper T6 costs $79.", "$79")], 13, 0.5)
    assert leakage_passed(clean) is True


# Which known-bad input must fail each criterion of params.yaml's gate (keyed by metric).
KNOWN_BAD = {
    "eval.json:headline.finetuned_rag_abstention_unanswerable_ci95_low": "hedge",
    "eval.json:headline.finetuned_rag_abstention_false_premise": "hedge",
    "eval.json:headline.finetuned_rag_unsupported_answerable_ci95_high": "random",
    "eval.json:headline.finetuned_rag_wrong_refusal_answerable": "abstain",
    "eval.json:leakage.passed": "leaked",
    "csat.json:finetuned.misled_rate": "hedge",
    "csat.json:finetuned.csat_ci95_low": "random",
    "eval.json:headline.finetuned_rag_f1_unseen_ci95_low": "random",
    "agent.json:finetuned.tool_call_validity": "random",
    "agent.json:finetuned.claimed_undone_rate": "random",
}


def agent_metrics(how: str) -> dict:
    """agent.json of a known answerer: `oracle` looks the order up and reports it; the bad ones
    send a malformed call and then claim a refund the episode never made."""
    from veritune.agent_tasks import score_episode, summarise

    task = {"id": "t1", "facts": ["shipped"], "gold_calls": [{"name": "get_order", "parameters": {"order_id": 1042}}]}
    if how == "oracle":
        calls = [{"name": "get_order", "parameters": {"order_id": 1042}, "valid": True,
                  "result": {"order_id": 1042, "status": "shipped"}}]
        answer = "Order 1042 has shipped."
    else:
        calls = [{"name": None, "parameters": None, "valid": False, "result": {"error": "malformed tool call"}}]
        answer = "I have refunded order 1042 in full."
    results = [{"task_id": "t1", "stop": "answer", "n_steps": 2, "answer": answer,
                **score_episode(task, answer, {}, {}, calls)}]
    return {"finetuned": summarise(results, 1)}


def test_every_shipped_gate_criterion_fails_on_a_known_bad_input(sample, tmp_path):
    """No criterion of params.yaml's gate is one that cannot fail: each is run on metrics
    computed from a known-bad answerer (random words, always refusing, refusing around an
    invented price) or a known leak, and must fail there, while the gold answerer passes."""
    import yaml

    from veritune.io import write_json

    criteria = parse_params("gate", yaml.safe_load((REPO / "params.yaml").read_text())["gate"]).criteria
    unknown = [c.metric for c in criteria if c.metric not in KNOWN_BAD]
    assert not unknown, f"gate criteria without a known-bad input in this test: {unknown}"
    questions, passages = sample
    failed: dict[str, set] = {}
    for how in ("oracle", "random", "abstain", "hedge", "leaked"):
        answerer_how = "oracle" if how == "leaked" else how
        scores, _ = run(answerer_how, questions, passages)
        leakage = _warned_leak() if how == "leaked" else leakage_check([], [], [], 13, 0.5)
        metrics = tmp_path / how
        metrics.mkdir()
        write_json(metrics / "eval.json", {"headline": headline({"finetuned": {"rag": scores}}, questions, 200),
                                           "leakage": {"passed": leakage_passed(leakage)}})
        write_json(metrics / "csat.json", {"finetuned": simulate_with(answerer_how, questions)[3]})
        write_json(metrics / "agent.json", agent_metrics(answerer_how))
        failed[how] = {row["metric"] for row in check_criteria(criteria, metrics) if not row["passed"]}
    assert not failed["oracle"], failed["oracle"]
    for metric, how in KNOWN_BAD.items():
        assert metric in failed[how], (metric, how, failed[how])
