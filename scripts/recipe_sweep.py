"""The tiny default's training recipe, swept: pretraining x tokenizer x SFT data x schedule.

    python scripts/recipe_sweep.py prepare                 # CPU, needs `dvc repro build_sft` (index, split)
    python scripts/recipe_sweep.py NAME [key=value ...]    # one configuration (keys: DEFAULT below)

`prepare` caches what needs the Milvus index (retrieved passages for train and test
questions, the agent trajectories and test prompts) in sweep/recipe/, so a configuration
needs only torch, transformers and peft and runs on a GPU machine with nothing else
installed. Each run builds the tokenizer and the tiny base, pretrains it, trains (LoRA by
default) with its own short loop (bf16 autocast, length-grouped batches, cosine schedule:
the `train` stage's recipe without TRL), then scores greedy RAG answers on the test split
(token F1 by document status, abstention, wrong refusals; oracle-context F1) and, with
agent trajectories, the validity of the first tool call on the agent test tasks.
Appends one JSON line to $OUT/results.jsonl (default sweep/recipe/).
Results of the sweep that chose the defaults: bench/results/recipe_sweep_h100.jsonl.
"""

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
from veritune.core import chat
from veritune.core.config import load_params
from veritune.data.sft import build_examples
from veritune.eval.scoring import is_abstention, token_f1
from veritune.infer.decode import generate
from veritune.model.modeling import TinyArch, build_tiny_model, build_tiny_tokenizer
from veritune.model.pretrain import make_window
from veritune.train.tokenization import tokenize_example

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CACHE = Path("sweep/recipe")
if sys.argv[1:2] != ["prepare"]:
    D = json.load(open(CACHE / "gs.json"))
    AGENT = json.load(open(CACHE / "agent.json"))
    AGENT_TEST = json.load(open(CACHE / "agent_test.json"))


@torch.inference_mode()
def agent_eval(model, tok):
    tok.padding_side = "left"
    prompts = [chat.format_chat(m, add_generation_prompt=True) for m in AGENT_TEST["prompts"]]
    stops = [tok.convert_tokens_to_ids(t) for t in (chat.EOT, chat.EOM, chat.END_OF_TEXT)]
    valid = right = 0
    outs = []
    model.eval()
    for s in range(0, len(prompts), 16):
        enc = tok(prompts[s : s + 16], return_tensors="pt", padding=True, add_special_tokens=False).to(DEV)
        with autocast():
            out = model.generate(
                **enc, max_new_tokens=64, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
            )
        outs += [
            tok.decode(r, skip_special_tokens=False).replace(chat.PAD, "") for r in out[:, enc["input_ids"].shape[1] :]
        ]
    model.train()
    for o, g in zip(outs, AGENT_TEST["gold"]):
        if o.startswith(chat.PYTHON_TAG) and chat.EOM in o:
            try:
                obj = json.loads(o[len(chat.PYTHON_TAG) : o.index(chat.EOM)])
                if obj.get("name") in AGENT_TEST["tools"] and isinstance(obj.get("parameters"), dict):
                    valid += 1
                    right += bool(g) and obj["name"] == g["name"] and obj["parameters"] == g["parameters"]
            except Exception:
                pass
    n = len(outs)
    return {
        "agent_first_valid": round(valid / n, 3),
        "agent_first_exact": round(right / n, 3),
        "agent_example": outs[0][:160],
    }


DEFAULT = dict(
    vocab=4096,
    hidden=256,
    layers=4,
    heads=8,
    kv=2,
    inter=688,
    pt_steps=200,
    pt_bs=8,
    pt_len=256,
    pt_lr=3e-3,
    pt_repeat=0.5,
    pt_warm=30,
    lora=1,
    r=32,
    alpha=64,
    lr=2e-3,
    sft_steps=270,
    bs=16,
    warm=0.03,
    ctx=2,
    samples=2,
    drop=0.1,
    agent=0,
    multiturn=0,
    evals="",
    seed=0,
    eval_n=0,
    base="",
    sft="",
    tok_fmt=0,
    pt_fmt=0,
    tok_ws=0,
    curr=0.0,
    cf=0.0,
    pt_cf=0,
    cf_kinds="single_hop",
    theta=500000.0,
    pt_lookup=0.0,
    lk_q=4,
    lk_cue=3,
    lk_ans=4,
    quote=0,
    gen=24,
)

DIGITS = re.compile(r"\d+")


def digit_map(rng):
    mapping = {}

    def sub(m):
        s = m.group(0)
        if s not in mapping:
            first = rng.choice("123456789") if s[0] != "0" else "0"
            mapping[s] = first + "".join(rng.choice("0123456789") for _ in s[1:])
        return mapping[s]

    return sub


def parse(argv):
    cfg = dict(DEFAULT)
    for a in argv:
        k, v = a.split("=", 1)
        cfg[k] = (
            type(DEFAULT[k])(float(v))
            if isinstance(DEFAULT[k], (int, float)) and not isinstance(DEFAULT[k], bool)
            else v
        )
    return cfg


def cosine(step, total, warm, peak, floor=0.1):
    if step < warm:
        return peak * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def autocast():
    return torch.autocast(DEV, dtype=torch.bfloat16)


def lookup_window(docs, cfg, marks, rng):
    """Two or three documents, then cloze queries on them: a few tokens from one of them (the
    cue) and the tokens that follow it there, which only a look back at the cue can predict."""
    q_mark, a_mark = marks
    cue, ans, n = cfg["lk_cue"], cfg["lk_ans"], cfg["pt_len"]
    w = []
    while len(w) <= n:
        shown = [docs[rng.randrange(len(docs))] for _ in range(rng.choice((2, 3)))]
        for d in shown:
            w.extend(d)
        for _ in range(cfg["lk_q"]):
            d = rng.choice(shown)
            if len(d) < cue + ans + 2:
                continue
            i = rng.randrange(1, len(d) - cue - ans)
            w.extend(q_mark + d[i : i + cue] + a_mark + d[i + cue : i + cue + ans])
    return w[: n + 1]


def pretrain(model, tok, cfg):
    bos, eot = tok.convert_tokens_to_ids([chat.BEGIN_OF_TEXT, chat.END_OF_TEXT])
    rng = random.Random(cfg["seed"])
    texts = list(D["train_texts"])
    if cfg["pt_fmt"]:
        texts += [chat.format_chat(e["messages"][:2]).removeprefix(chat.BEGIN_OF_TEXT) for e in AGENT]
    if cfg["pt_cf"]:
        variants = [
            [
                [bos] + tok(DIGITS.sub(digit_map(rng), t), add_special_tokens=False)["input_ids"] + [eot]
                for _ in range(cfg["pt_cf"])
            ]
            for t in texts
        ]
    else:
        variants = [[[bos] + tok(t, add_special_tokens=False)["input_ids"] + [eot]] for t in texts]
    marks = (tok("\nQ:", add_special_tokens=False)["input_ids"], tok(" A:", add_special_tokens=False)["input_ids"])
    model.to(DEV).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pt_lr"], betas=(0.9, 0.95), weight_decay=0.1)
    ntok = 0
    for step in range(cfg["pt_steps"]):
        docs = [rng.choice(v) for v in variants]  # one variant of each document per step: a repeat copies it
        batch = torch.tensor(
            [
                lookup_window(docs, cfg, marks, rng)
                if rng.random() < cfg["pt_lookup"]
                else make_window(docs, cfg["pt_len"], cfg["pt_repeat"], rng)
                for _ in range(cfg["pt_bs"])
            ],
            device=DEV,
        )
        for g in opt.param_groups:
            g["lr"] = cosine(step, cfg["pt_steps"], cfg["pt_warm"], cfg["pt_lr"])
        with autocast():
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ntok += batch.numel()
    return loss.item(), ntok


def sft_examples(cfg, ctx=None):
    p = dataclasses.replace(
        load_params("build_sft"),
        context_chunks=ctx or cfg["ctx"],
        oracle_drop_rate=cfg["drop"],
        seed=cfg["seed"],
        turns_per_conversation=max(1, cfg["multiturn"]),
        retrieval_pool=10,
        unanswerable_follow_up_rate=0.0,
        off_topic_follow_up_rate=0.0,
        off_topic_requests=(),
    )
    ex = build_examples(D["train_q"], D["train_ret"], D["train_chunks"], p, samples_per_question=cfg["samples"])
    if cfg["cf"] > 0:
        rng = random.Random(cfg["seed"] + 2)
        kinds = set(cfg["cf_kinds"].split("+"))
        n = 0
        for e in ex:
            ans = e["messages"][-1]["content"]
            user = e["messages"][1]["content"]
            runs = DIGITS.findall(ans)
            first = e["messages"][2]["content"]
            runs = runs + DIGITS.findall(first)
            if (
                e["kind"] in kinds
                and e["has_oracle"]
                and runs
                and all(r in user for r in runs)
                and rng.random() < cfg["cf"]
            ):
                sub = digit_map(rng)
                for m in e["messages"][1:]:
                    m["content"] = DIGITS.sub(sub, m["content"])
                n += 1
        print("counterfactual examples:", n, "of", len(ex), flush=True)
    if cfg["quote"]:
        n = sum(quote_then_answer(e["messages"]) for e in ex)
        print("answers with a quoted sentence:", n, flush=True)
    msgs = [e["messages"] for e in ex]
    if cfg["agent"]:
        msgs += [e["messages"] for e in AGENT] * cfg["agent"]
    return msgs


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def quote_then_answer(messages):
    """Rewrite each answer as the passage sentence that states it, then the answer: copying a
    sentence is induction all the way, and the value follows the very words it follows in the
    passage. Returns how many answers were rewritten."""
    sentences = [x.strip() for x in SENTENCE_END.split(messages[1]["content"]) if x.strip()]
    abstain = load_params("build_sft").abstain_answer
    n = 0
    for m in messages[2:]:
        if m["role"] != "assistant" or m["content"] == abstain:
            continue
        ans = m["content"]
        hit = next((x for x in sentences if ans in x), None) or next(
            (x for x in sentences if ans.lower() in x.lower()), None
        )
        if hit:
            m["content"] = f'Quote: "{hit}"\nAnswer: {ans}'
            n += 1
    return n


def final_answer(reply):
    return reply.rsplit("Answer:", 1)[1].strip() if "Answer:" in reply else reply


def batches(rows, bs, rng):
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    # group by length within windows of 32 batches
    chunk = bs * 32
    out = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: len(rows[i]["input_ids"]))
        out += [part[j : j + bs] for j in range(0, len(part), bs)]
    rng.shuffle(out)
    return out


def collate(rows, pad):
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), L), pad)
    lab = torch.full((len(rows), L), -100)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        lab[i, :n] = torch.tensor(r["labels"])
        att[i, :n] = 1
    return ids.to(DEV), lab.to(DEV), att.to(DEV)


def evaluate(model, tok, cfg, n=0):
    qs, rag, orc = D["test_q"], D["test_rag"], D["test_oracle"]
    idx = list(range(len(qs)))
    if n:
        random.Random(0).shuffle(idx)
        idx = idx[:n]
    convs = [
        chat.rag_messages(load_params("build_sft").system_prompt, qs[i]["question"], rag[i][: cfg["ctx"]]) for i in idx
    ]
    convs_o = [
        chat.rag_messages(load_params("build_sft").system_prompt, qs[i]["question"], orc[i])
        for i in idx
        if qs[i]["answers"]
    ]
    model.eval()
    with autocast():
        raw = generate(model, tok, convs, cfg["gen"], 64, desc="eval")
        pred = [final_answer(x) for x in raw]
        pred_o = [final_answer(x) for x in generate(model, tok, convs_o, cfg["gen"], 64, desc="eval-oracle")]
    model.train()
    g = defaultdict(list)
    for i, pr in zip(idx, pred):
        q = qs[i]
        if q["answers"]:
            key = f"{q['kind']}_{q['doc_status']}"
            g["f1_" + key].append(token_f1(pr, q["answers"]))
            g["f1_unseen" if q["doc_status"] == "unseen" else "f1_seen"].append(token_f1(pr, q["answers"]))
            g["wrong_refusal"].append(float(is_abstention(pr)))
        else:
            g["abstain_unans"].append(float(is_abstention(pr)))
    ans = [i for i in idx if qs[i]["answers"]]
    for i, pr in zip(ans, pred_o):
        g["oracle_f1_" + qs[i]["doc_status"]].append(token_f1(pr, qs[i]["answers"]))
    res = {k: round(sum(v) / len(v), 3) for k, v in sorted(g.items())}
    ex = [(qs[i]["question"][:60], qs[i]["answers"][:1], pr) for i, pr in list(zip(idx, raw))[:8]]
    return res, ex


def prepare():
    """Cache the retrieval-dependent inputs (needs the index; CPU is fine)."""
    import dataclasses
    import json
    from datetime import date
    from pathlib import Path

    from veritune.agent.specs import TOOL_NAMES, tool_definitions
    from veritune.core import chat
    from veritune.core.config import load_params
    from veritune.core.io import read_jsonl
    from veritune.eval.evaluation import oracle_documents
    from veritune.retrieval.search import Retriever

    out = CACHE
    out.mkdir(parents=True, exist_ok=True)
    ip = load_params("index")
    docs = (
        {d["id"]: d for d in read_jsonl("data/validated/documents.jsonl")}
        if Path("data/validated/documents.jsonl").exists()
        else {d["id"]: d for d in read_jsonl("data/raw/documents.jsonl")}
    )
    doc_split = json.loads(Path("data/split/doc_split.json").read_text())
    chunks = read_jsonl("data/index/chunks.jsonl")
    train_q = read_jsonl("data/split/questions_train.jsonl")
    test_q = read_jsonl("data/split/questions_test.jsonl")
    readable = {d for d, s in doc_split.items() if s == "train"}
    with Retriever(ip.uri, ip.collection, ip.embedding_model) as r:
        hits = r.search([q["question"] for q in train_q], k=20)
        train_ret = [[dataclasses.asdict(h) for h in row if h.doc_id in readable][:10] for row in hits]
        th = r.search([q["question"] for q in test_q], k=5)
        test_ret = [[dataclasses.asdict(h) for h in row] for row in th]
    json.dump(
        {
            "train_texts": [f"{d['title']}\n{d['text']}" for d in docs.values() if doc_split[d["id"]] == "train"],
            "train_chunks": [c for c in chunks if c["doc_id"] in readable],
            "train_q": train_q,
            "train_ret": train_ret,
            "test_q": test_q,
            "test_rag": test_ret,
            "test_oracle": oracle_documents(test_q, docs, [t[:2] for t in test_ret]),
        },
        open(out / "gs.json", "w"),
    )
    agent = [e for e in read_jsonl("data/sft/train.jsonl") if any(m["role"] == "ipython" for m in e["messages"])]
    json.dump(agent, open(out / "agent.json", "w"))
    print(len(train_q), len(test_q), len(agent))
    # agent: first-turn prompts of the test tasks, and the gold first call
    sp = load_params("build_sft")
    ap = load_params("agent_db")
    tools = tool_definitions(sp.agent_tool_definitions)
    tasks = read_jsonl("data/agent/tasks_test.jsonl")
    json.dump(
        {
            "prompts": [
                chat.tool_messages(
                    sp.agent_system_prompt,
                    tools,
                    chat.neutralize_special_tokens(t["request"]),
                    chat.header_date(date.fromisoformat(ap.today)),
                )
                for t in tasks
            ],
            "gold": [t["gold_calls"][0] if t["gold_calls"] else None for t in tasks],
            "tools": list(TOOL_NAMES),
        },
        open(out / "agent_test.json", "w"),
    )


def main():
    if sys.argv[1] == "prepare":
        return prepare()
    name, cfg = sys.argv[1], parse(sys.argv[2:])
    torch.manual_seed(cfg["seed"])
    t0 = time.time()
    corpus = list(D["train_texts"])
    if cfg["tok_fmt"]:
        # the conversations' format (chat headers, prompts, tool definitions and calls) joins the documents
        corpus += [chat.format_chat(m) for m in sft_examples(cfg)] + [chat.format_chat(e["messages"]) for e in AGENT]
    if cfg["base"]:  # a built base (models/base): no tokenizer, model or pretraining here
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg["base"])
        model = AutoModelForCausalLM.from_pretrained(cfg["base"])
        pt_loss, pt_tok = float("nan"), 0
    else:
        tok = build_tiny_tokenizer(corpus, cfg["vocab"], isolate_whitespace=bool(cfg["tok_ws"]))
        model = build_tiny_model(
            TinyArch(
                cfg["vocab"], cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv"], cfg["inter"], 4096, cfg["theta"]
            ),
            tok,
            cfg["seed"],
        )
        pt_loss, pt_tok = pretrain(model, tok, cfg)
    t_pt = time.time() - t0
    msgs = sft_examples(cfg) if not cfg["sft"] else [json.loads(x)["messages"] for x in open(cfg["sft"])]
    rows = [tokenize_example(m, tok) for m in msgs]
    rows = [r for r in rows if len(r["input_ids"]) <= 2048]
    rows1 = [tokenize_example(m, tok) for m in sft_examples(cfg, 1)] if cfg["curr"] > 0 else None
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg["r"],
                lora_alpha=cfg["alpha"],
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    model.to(DEV).train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    rng = random.Random(cfg["seed"])
    total = cfg["sft_steps"]
    evals = {int(x) for x in cfg["evals"].split(",") if x} if cfg["evals"] else set()
    plan = []
    n1 = int(cfg["curr"] * total)
    while len(plan) < n1:
        plan += [[("c", i) for i in b] for b in batches(rows1, cfg["bs"], rng)]
    plan = plan[:n1]
    while len(plan) < total:
        plan += [[("m", i) for i in b] for b in batches(rows, cfg["bs"], rng)]
    ntok = 0
    log = []
    t1 = time.time()
    losses = []
    for step in range(total):
        ids, lab, att = collate([(rows1 if w == "c" else rows)[i] for w, i in plan[step]], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = cosine(step, total, max(1, int(cfg["warm"] * total)), cfg["lr"], 0.0)
        with autocast():
            out = model(input_ids=ids, attention_mask=att)
        logits = out.logits.float()[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ntok += int(att.sum())
        losses.append(loss.item())
        if step + 1 in evals:
            r, _ = evaluate(model, tok, cfg, cfg["eval_n"])
            log.append({"step": step + 1, "tokens": ntok, "loss": sum(losses[-20:]) / len(losses[-20:]), **r})
            print(json.dumps(log[-1]), flush=True)
    t_sft = time.time() - t1
    r, ex = evaluate(model, tok, cfg, cfg["eval_n"])
    if cfg["agent"]:
        r.update(agent_eval(model, tok))
    res = {
        "prompt_tokens_mean": round(sum(len(x["input_ids"]) for x in rows) / len(rows)),
        "name": name,
        "cfg": {k: v for k, v in cfg.items() if v != DEFAULT[k]},
        "pt_loss": round(pt_loss, 3),
        "pt_tokens": pt_tok,
        "sft_tokens": ntok,
        "sft_examples": len(rows),
        "sft_loss_end": round(sum(losses[-20:]) / 20, 3),
        "t_pt": round(t_pt, 1),
        "t_sft": round(t_sft, 1),
        "curve": log,
        **r,
        "examples": ex,
    }
    print("RESULT", json.dumps(res), flush=True)
    out = Path(os.environ.get("OUT", str(CACHE)))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
