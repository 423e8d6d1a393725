"""Supervised fine-tuning examples: RAFT-style grounded QA in the chat format.

Each training question becomes one conversation whose user turn carries retrieved
passages. Answerable questions usually see their oracle passage(s) among distractors and
are answered from them; a share (`oracle_drop_rate`) sees only distractors and, like
unanswerable questions, is answered with an explicit abstention. That teaches the model to
copy from the context when it can and to say so when it cannot, instead of guessing.

Tool trajectories (`build_agent_examples`) add the train agent tasks' gold workflows,
format-neutral (tools, calls and results laid out in the base checkpoint's own tool-calling
format at tokenization, `veritune.train.tokenization`), tool results produced by the real
tools; the loss covers every assistant turn, the calls included.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from veritune.core import chat
from veritune.core.params import BuildSftParams
from veritune.infer import calc


def oracle_chunks(question: dict, chunks_by_doc: dict[str, list[dict]]) -> list[dict]:
    """One chunk per supporting document: the one holding an answer string, else the first."""
    out = []
    for doc_id in question["doc_ids"]:
        doc_chunks = chunks_by_doc.get(doc_id, [])
        if not doc_chunks:
            continue
        holding = [c for c in doc_chunks if any(a and a in c["text"] for a in question["answers"])]
        out.append(holding[0] if holding else doc_chunks[0])
    return out


def select_passages(
    question: dict,
    retrieved: Sequence[dict],
    chunks_by_doc: dict[str, list[dict]],
    p: BuildSftParams,
    rng: random.Random,
) -> tuple[list[dict], bool]:
    """The passages shown for one training question and whether they include the oracle."""
    gold = set(question["doc_ids"])
    distractors = [h for h in retrieved if h["doc_id"] not in gold]
    # Hardest distractors first, but not always the same ones: later samples of a
    # question see others from the retrieval pool.
    distractors = distractors[:1] + rng.sample(distractors[1:], len(distractors) - 1)
    if p.hard_distractor_rate < 1.0:
        # Random distractors are easier than retrieved look-alikes: a small model first
        # learns which passage to read from them, then the hard ones sharpen it.
        corpus = [c for doc_id, cs in chunks_by_doc.items() if doc_id not in gold for c in cs]
        distractors = [d if rng.random() < p.hard_distractor_rate else rng.choice(corpus) for d in distractors]
    answerable = bool(question["answers"])
    if answerable and rng.random() >= p.oracle_drop_rate:
        # Every supporting passage, also past context_chunks: a total over three products is
        # only answerable from all three (entity-aware search shows one per named product).
        oracles = oracle_chunks(question, chunks_by_doc)
        passages = oracles + distractors[: max(0, p.context_chunks - len(oracles))]
        rng.shuffle(passages)
        return passages, bool(oracles)
    if answerable:
        return distractors[: p.context_chunks], False
    # Unanswerable: show what retrieval really returns, supporting documents included; the
    # question is built so that they do not answer it.
    return list(retrieved[: p.context_chunks]), False


def target_answer(question: dict) -> str:
    """What the model learns to write for an answerable question: its first answer, or, when
    the record has a `calculation` (the figures the answer is computed from, "$299 + $219"),
    that calculation as a calculator span (`veritune.infer.calc`), which must resolve to one
    of the answers."""
    calculation = question.get("calculation")
    if not calculation:
        return question["answers"][0]
    if not isinstance(calculation, str):
        raise ValueError(f"question {question['id']}: field 'calculation' must be a string, got {calculation!r}")
    span = f"{calc.OPEN}{calculation}{calc.CLOSE}"
    result = calc.resolve(span)
    if result not in question["answers"]:
        raise ValueError(
            f"question {question['id']}: field 'calculation' {calculation!r} evaluates to {result!r}, "
            f"which is none of its answers {question['answers']}"
        )
    return span


def build_example(question: dict, passages: list[dict], has_oracle: bool, p: BuildSftParams) -> dict:
    answer = target_answer(question) if (has_oracle and question["answers"]) else p.abstain_answer
    messages = chat.rag_messages(p.system_prompt, question["question"], passages, p.question_position)
    messages.append({"role": "assistant", "content": answer})
    return {
        "id": question["id"],
        "kind": question["kind"],
        "has_oracle": has_oracle,
        "passage_ids": [c["chunk_id"] for c in passages],
        "messages": messages,
    }


def add_follow_ups(
    example: dict,
    passages: list[dict],
    pools: FollowUpPools,
    turns: int,
    abstain_answer: str,
    unanswerable_rate: float,
    rng: random.Random,
    off_topic_rate: float = 0.0,
    off_topic: Sequence[str] = (),
) -> None:
    """Extend `example` with up to `turns - 1` further questions on its passages, each a
    supervised assistant turn: the prompt is read once, several answers are learnt from it (on
    the tiny default, 4 turns doubled held-out F1 at equal steps). A share
    (`unanswerable_rate`) are questions the passages cannot answer, answered with the
    abstention: about a shown document that does not state the fact or contradicts the
    question's premise, else about a product that does not exist. Without them every
    follow-up is answerable and a conversation teaches refusal at most once. Another share
    (`off_topic_rate`) are requests outside the domain (`off_topic`: a poem, the news), which a
    support assistant declines the same way."""
    shown = {c["doc_id"]: c["text"] for c in passages}
    answerable = [
        q
        for doc_id in shown
        for q in pools.answerable.get(doc_id, ())
        if q["id"] != example["id"] and any(a in shown[doc_id] for a in q["answers"])
    ]
    rng.shuffle(answerable)
    unanswerable = []
    if unanswerable_rate > 0:  # rate 0 draws nothing more: the conversations stay as they were
        unanswerable = [q for doc_id in shown for q in pools.unanswerable.get(doc_id, ()) if q["id"] != example["id"]]
        rng.shuffle(unanswerable)
    used = {example["id"]}
    for _ in range(turns - 1):
        if off_topic_rate > 0 and rng.random() < off_topic_rate:
            fresh = [r for r in off_topic if f"off-topic:{r}" not in used]
            request = rng.choice(fresh) if fresh else None
            q = request and {"id": f"off-topic:{request}", "question": request}
            answer = abstain_answer
        elif unanswerable_rate > 0 and rng.random() < unanswerable_rate:
            about_shown = [q for q in unanswerable if q["id"] not in used]
            q = about_shown[0] if about_shown else rng.choice(pools.entityless) if pools.entityless else None
            answer = abstain_answer
        else:
            q = next((q for q in answerable if q["id"] not in used), None)
            answer = q and next(a for a in q["answers"] if a in shown[q["doc_ids"][0]])
        if q is None or q["id"] in used:
            break
        used.add(q["id"])
        example["messages"] += [
            {"role": "user", "content": f"Question: {q['question']}"},
            {"role": "assistant", "content": answer},
        ]
        example.setdefault("follow_up_ids", []).append(q["id"])


@dataclass(frozen=True)
class FollowUpPools:
    """Follow-up candidates: answerable single-document questions by document, unanswerable
    ones by the document they are about, and unanswerable ones about no document."""

    answerable: dict[str, list[dict]]
    unanswerable: dict[str, list[dict]]
    entityless: list[dict]

    @classmethod
    def of(cls, questions: Sequence[dict]) -> FollowUpPools:
        answerable: dict[str, list[dict]] = defaultdict(list)
        unanswerable: dict[str, list[dict]] = defaultdict(list)
        entityless = []
        for q in questions:
            if q["kind"] == "single_hop" and len(q["doc_ids"]) == 1 and q["answers"]:
                answerable[q["doc_ids"][0]].append(q)
            elif not q["answers"]:
                for doc_id in q["doc_ids"]:
                    unanswerable[doc_id].append(q)
                if not q["doc_ids"]:
                    entityless.append(q)
        return cls(dict(answerable), dict(unanswerable), entityless)


def build_examples(
    questions: Sequence[dict],
    retrieved: Sequence[Sequence[dict]],
    chunks: Sequence[dict],
    p: BuildSftParams,
    samples_per_question: int = 1,
) -> list[dict]:
    rng = random.Random(p.seed)
    chunks_by_doc: dict[str, list[dict]] = defaultdict(list)
    for c in chunks:
        chunks_by_doc[c["doc_id"]].append(c)
    pools = FollowUpPools.of(questions)
    examples = []
    for q, hits in zip(questions, retrieved, strict=True):
        for _ in range(samples_per_question):
            passages, has_oracle = select_passages(q, hits, chunks_by_doc, p, rng)
            example = build_example(q, passages, has_oracle, p)
            if p.turns_per_conversation > 1:
                add_follow_ups(
                    example,
                    passages,
                    pools,
                    p.turns_per_conversation,
                    p.abstain_answer,
                    p.unanswerable_follow_up_rate,
                    rng,
                    p.off_topic_follow_up_rate,
                    p.off_topic_requests,
                )
            examples.append(example)
    return examples


def build_agent_examples(tasks: Sequence[dict], db_path, search, p: BuildSftParams, today) -> list[dict]:
    """One conversation per train agent task and copy: request, gold calls with the real
    tools' results (each on a fresh copy of the database), gold answer."""
    import tempfile

    from veritune.agent.shop import episode_database
    from veritune.agent.specs import tool_definitions
    from veritune.agent.tasks import gold_trajectory
    from veritune.agent.tools import Toolbox

    tools = tool_definitions(p.agent_tool_definitions)
    examples = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            with Toolbox(episode_database(db_path, tmp, task["id"]), search=search, today=today) as box:
                messages = gold_trajectory(task, box, p.agent_system_prompt)
            examples += [
                {
                    "id": f"{task['id']}-{j}",
                    "kind": "agent",
                    "has_oracle": True,
                    "passage_ids": [],
                    "messages": messages,
                    "tools": tools,
                    "today": chat.header_date(today),
                }
                for j in range(p.agent_samples_per_task)
            ]
    return examples
