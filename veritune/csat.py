"""Simulated customers talk to the model; a transparent rubric turns each conversation into CSAT 1-5.

Every customer has a goal drawn from the test questions and one persona:

- patient: repeats the question ("That doesn't answer my question. ...") until it is answered
  or `max_turns` run out;
- impatient: the same, but gives up after `impatient_turns` unanswered turns;
- rephraser: asks in its own words from the start and rephrases differently every turn;
- follow_up: once answered, asks a second question about a related document (same product or
  document); it is satisfied only if both are answered;
- off_topic: first asks something outside the domain (a good assistant declines), then its goal.

The customer judges each reply by rules, not by a model: an answerable goal is resolved when the
reply does not abstain and its token F1 against the gold answer reaches `resolve_f1`; an
unanswerable goal is resolved when the reply abstains. A refusal of an answerable goal is a
wrong refusal. Every reply is also checked by the groundedness scorer against the passages the
model read and the customer's message: a reply with unsupported claims misled the customer.

`csat_score` is the rubric (numbers in params `csat.rubric`):

    resolved:            resolved_first_turn - turn_penalty x (extra turns needed), not below
                         resolved_floor; minus unsupported_penalty if any reply was unsupported
    main goal only:      partially_resolved (follow-up customers), minus unsupported_penalty likewise
    not resolved:        unresolved_honest if every reply was grounded or a refusal, else unresolved_misled

A wrong refusal costs a turn (the customer asks again) or, if it persists, leaves the goal
unresolved. Scores are clamped to 1..5.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Sequence

from veritune import chat
from veritune.groundedness import score_groundedness
from veritune.scoring import bootstrap_ci, mean, token_f1

PERSONAS = ("patient", "impatient", "rephraser", "follow_up", "off_topic")

OFF_TOPIC_QUESTIONS = [
    "Before that: what's the capital of Australia?",
    "Quick one first, who won the football last night?",
    "Can you recommend a good pizza place near me?",
    "What will the weather be like tomorrow?",
    "First, can you write me a short poem about autumn?",
]
REPHRASINGS = [
    "Let me put it another way. {q}",
    "Could you check the documents again? {q}",
    "I'm asking about {topic}. {q}",
    "Sorry if that was unclear. {q}",
]
# Answer function: for each (history of (user, reply) pairs, new user message) the reply and the passages read.
AnswerFn = Callable[[Sequence[tuple[list[tuple[str, str]], str]]], list[tuple[str, list[dict]]]]


def make_customers(questions: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` customers, personas in turn, goals sampled without replacement from the test questions."""
    if not questions:
        raise ValueError("no test questions to draw customer goals from")
    rng = random.Random(seed)
    goals = rng.sample(list(questions), min(n, len(questions)))
    while len(goals) < n:
        goals.append(rng.choice(questions))
    customers = []
    for i, goal in enumerate(goals):
        persona = PERSONAS[i % len(PERSONAS)]
        customer = {"id": f"c-{i:03d}", "persona": persona, "goals": [goal]}
        follow_up = related_question(goal, questions, rng) if persona == "follow_up" else None
        if follow_up:
            customer["goals"].append(follow_up)
        if persona == "off_topic":
            # The n-th off-topic customer asks the n-th question: every question gets asked.
            customer["off_topic"] = OFF_TOPIC_QUESTIONS[(i // len(PERSONAS)) % len(OFF_TOPIC_QUESTIONS)]
        customers.append(customer)
    return customers


def related_question(goal: dict, questions: Sequence[dict], rng: random.Random) -> dict | None:
    """An answerable question about the same product or a shared document; any other one if
    none; None if no other answerable question exists."""
    others = [q for q in questions if q["id"] != goal["id"] and q["answers"]]
    related = [q for q in others if (goal.get("product") and q.get("product") == goal.get("product"))
               or set(q["doc_ids"]) & set(goal["doc_ids"])]
    return rng.choice(related or others) if others else None


def rephrase(goal: dict, attempt: int) -> str:
    topic = f"the {goal['product']}" if goal.get("product") else "your products"
    return REPHRASINGS[attempt % len(REPHRASINGS)].format(q=goal["question"], topic=topic)


def judge_reply(goal: dict | None, user: str, reply: str, passages: Sequence[dict], resolve_f1: float) -> dict:
    """The customer's view of one reply. `goal=None` is the off-topic turn."""
    grounded = score_groundedness(user, [p["text"] for p in passages], reply)
    # A refusal that still asserts unsupported claims misled the customer: not an abstention.
    abstained = grounded["label"] == "abstained"
    out = {"abstained": abstained, "unsupported": grounded["label"] == "unsupported"}
    if goal is None:
        out["resolved"] = abstained  # declining an out-of-domain question is the right reply
        return out
    if goal["answers"]:
        out["f1"] = 0.0 if abstained else round(token_f1(reply, goal["answers"]), 4)
        out["resolved"] = not abstained and out["f1"] >= resolve_f1
        out["wrong_refusal"] = abstained
    else:
        out["resolved"] = abstained
    return out


def simulate(customers: Sequence[dict], answer: AnswerFn, max_turns: int, impatient_turns: int,
             resolve_f1: float) -> list[dict]:
    """Hold every conversation, all customers' turn t answered in one batch."""
    convs = []
    for c in customers:
        first = c["off_topic"] if c["persona"] == "off_topic" else (
            rephrase(c["goals"][0], 2) if c["persona"] == "rephraser" else c["goals"][0]["question"])
        convs.append({"customer": c, "turns": [], "goal_index": 0 if c["persona"] != "off_topic" else -1,
                      "failures": 0, "next": first, "outcome": None})
    while True:
        open_convs = [v for v in convs if v["outcome"] is None]
        if not open_convs:
            return convs
        replies = answer([([(t["user"], t["reply"]) for t in v["turns"]], v["next"]) for v in open_convs])
        for v, (reply, passages) in zip(open_convs, replies, strict=True):
            c, gi = v["customer"], v["goal_index"]
            goal = c["goals"][gi] if gi >= 0 else None
            verdict = judge_reply(goal, v["next"], reply, passages, resolve_f1)
            v["turns"].append({"user": v["next"], "reply": reply, "goal": goal["id"] if goal else None,
                               "passages": [p["doc_id"] for p in passages], **verdict})
            _advance(v, verdict, max_turns, impatient_turns)


def _advance(v: dict, verdict: dict, max_turns: int, impatient_turns: int) -> None:
    c = v["customer"]
    if v["goal_index"] == -1:  # the off-topic opener: whatever the reply, now the real goal
        v["goal_index"], v["next"] = 0, c["goals"][0]["question"]
    elif verdict["resolved"]:
        v["failures"] = 0
        if v["goal_index"] + 1 < len(c["goals"]):
            v["goal_index"] += 1
            v["next"] = "Thanks! One more thing: " + c["goals"][v["goal_index"]]["question"]
        else:
            v["outcome"] = "resolved"
            return
    else:
        v["failures"] += 1
        goal = c["goals"][v["goal_index"]]
        if c["persona"] == "impatient" and v["failures"] >= impatient_turns:
            v["outcome"] = "gave_up"
            return
        v["next"] = (rephrase(goal, v["failures"] - 1) if c["persona"] in ("rephraser", "off_topic")
                     else "That doesn't answer my question. " + goal["question"])
    if len(v["turns"]) >= max_turns:
        v["outcome"] = "out_of_turns"


def csat_score(conv: dict, rubric) -> dict:
    """The rubric in the module docstring applied to one conversation."""
    c = conv["customer"]
    goal_turns = [t for t in conv["turns"] if t["goal"] is not None]
    resolved_goals = {t["goal"] for t in goal_turns if t["resolved"]}
    main_resolved = c["goals"][0]["id"] in resolved_goals
    all_resolved = all(g["id"] in resolved_goals for g in c["goals"])
    misled = any(t["unsupported"] for t in conv["turns"])
    extra_turns = len(goal_turns) - len(c["goals"])
    if all_resolved:
        score = max(rubric.resolved_first_turn - rubric.turn_penalty * extra_turns, rubric.resolved_floor)
        score -= rubric.unsupported_penalty * misled
        result = "resolved"
    elif main_resolved and len(c["goals"]) > 1:
        score = rubric.partially_resolved - rubric.unsupported_penalty * misled
        result = "partially_resolved"
    else:
        score = rubric.unresolved_misled if misled else rubric.unresolved_honest
        result = "unresolved"
    return {"csat": int(min(5, max(1, score))), "result": result, "misled": misled,
            "wrong_refusal": any(t.get("wrong_refusal") for t in goal_turns),
            "turns": len(conv["turns"]), "turns_to_resolution": len(goal_turns) if all_resolved else None}


def summarize_csat(scored: Sequence[dict], personas: Sequence[str], bootstrap_samples: int) -> dict:
    """Mean CSAT with its bootstrap interval, the 1..5 distribution and the rates behind them."""
    values = [s["csat"] for s in scored]
    lo, hi = bootstrap_ci(values, bootstrap_samples)
    counts = Counter(values)
    resolved_turns = [s["turns_to_resolution"] for s in scored if s["turns_to_resolution"] is not None]
    out = {
        "n": len(scored),
        "csat_mean": round(mean(values), 4),
        "csat_ci95_low": round(lo, 4),
        "csat_ci95_high": round(hi, 4),
        "distribution": {str(k): counts.get(k, 0) for k in range(1, 6)},
        "resolution_rate": round(mean(s["result"] == "resolved" for s in scored), 4),
        "partial_rate": round(mean(s["result"] == "partially_resolved" for s in scored), 4),
        "wrong_refusal_rate": round(mean(s["wrong_refusal"] for s in scored), 4),
        "misled_rate": round(mean(s["misled"] for s in scored), 4),
        "mean_turns": round(mean(s["turns"] for s in scored), 4),
        "by_persona": {},
    }
    if resolved_turns:
        out["mean_turns_to_resolution"] = round(mean(resolved_turns), 4)
    for persona, s_p in zip(personas, scored, strict=True):
        out["by_persona"].setdefault(persona, []).append(s_p["csat"])
    out["by_persona"] = {p: {"n": len(v), "csat_mean": round(mean(v), 4)} for p, v in sorted(out["by_persona"].items())}
    return out


def turn_messages(system_prompt: str, history: Sequence[tuple[str, str]], user: str,
                  passages: Sequence[dict]) -> list[dict]:
    """The model's view: earlier turns as plain text, the new message with its retrieved passages."""
    messages = [{"role": "system", "content": system_prompt}]
    for u, r in history:
        messages += [{"role": "user", "content": f"Question: {u}"}, {"role": "assistant", "content": r or "..."}]
    messages.append(chat.rag_messages(system_prompt, user, passages)[1])
    return messages


def plot_histogram(summaries: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(summaries))
    for i, (variant, s) in enumerate(summaries.items()):
        shares = [s["distribution"][str(k)] / s["n"] for k in range(1, 6)]
        ax.bar([k + (i - (len(summaries) - 1) / 2) * width for k in range(1, 6)], shares, width,
               label=f"{variant} (mean {s['csat_mean']:.2f}, n={s['n']})")
    ax.set_xticks(range(1, 6))
    ax.set_xlabel("CSAT (1 = very dissatisfied, 5 = very satisfied)")
    ax.set_ylabel("share of conversations")
    ax.set_ylim(0, 1)
    ax.set_title("Simulated customer satisfaction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rubric_text(rubric) -> str:
    """The rubric with its current numbers, for the report."""
    return (f"CSAT rubric (params `csat.rubric`): resolved = {rubric.resolved_first_turn} minus "
            f"{rubric.turn_penalty} per extra turn the customer needed (a wrong refusal costs one), not below "
            f"{rubric.resolved_floor}, minus {rubric.unsupported_penalty} if any reply made unsupported claims; "
            f"follow-up customers with only the first question answered = {rubric.partially_resolved} (same "
            f"penalty); not resolved = {rubric.unresolved_honest} if every reply was grounded or a refusal, "
            f"{rubric.unresolved_misled} if any misled the customer. A goal is resolved when a reply does not "
            "refuse and reaches the token-F1 threshold vs the gold answer (`csat.resolve_f1`), or, for a question "
            "the documents cannot answer, when the reply declines. Personas: patient, impatient (leaves after "
            "`csat.impatient_turns` unanswered turns), rephraser, follow-up asker, off-topic opener.")
