"""Instruction data for fine-tuning: response-only loss masks, sequence packing and a data order
that is a pure function of (seed, step).

An example is {"instruction", "input", "output"} ("input" optional), read from an Alpaca /
Open-Platypus file by `qeft_jax.data.load_instructions` or built from the bundled tasks
(`builtin_examples`). It becomes token ids `prompt + response` by
`qeft_jax.tokenization.example_ids`, the prompt format that generation uses too (the chat template
when the tokenizer has one, else the Alpaca prompt; see that module); only response tokens are
loss targets.

Packing: examples are placed first-fit (longest first) into rows of exactly `seq_len` tokens,
separated by nothing (each example carries its own BOS/EOS from the template), padded at the end.
Every row records `segments` (1, 2, ... per example, 0 for padding). The trainer turns them into
per-example positions (each example starts at 0) and a block-diagonal causal mask
(`train.trainer.segment_layout`), so a packed example is computed exactly as it would be alone in
its own row; the loss never spans two examples because a target token is counted only if it is a
response token of the same example as its input token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from qeft_jax import data as data_mod
from qeft_jax import tokenization

# Bundled tasks with a train split usable as instructions (winogrande's per-choice contexts are not).
DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa")


def builtin_examples(tasks: Sequence[str] | None, limit_per_task: int, seed: int) -> list[dict[str, str]]:
    """The bundled instruction set (train splits of the built-in tasks), from qeft_jax.data."""
    if not tasks:
        avail = data_mod.list_tasks()
        tasks = [t for t in DEFAULT_TASKS if data_mod.TRAIN_VARIANT in avail.get(t, ())]
    return list(data_mod.instruction_examples(list(tasks), limit_per_task, seed))


def encode_example(tokenizer: Any, ex: dict[str, str], *, style: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], response_mask bool [n]) for one example: the prompt and response ids of
    `qeft_jax.tokenization.example_ids` (style None: chat template if any, else Alpaca), the mask
    True on the response."""
    p_ids, r_ids = tokenization.example_ids(tokenizer, ex["instruction"], ex.get("input") or "",
                                            ex["output"], style=style)
    ids = np.asarray(p_ids + r_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(p_ids):] = True
    return ids, mask


@dataclass
class Packed:
    """Fixed-length rows: tokens int32 [N, L], response bool [N, L], segments int32 [N, L]."""

    tokens: np.ndarray
    response: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, idx: np.ndarray) -> "Packed":
        return Packed(self.tokens[idx], self.response[idx], self.segments[idx])

    def loss_weights(self) -> np.ndarray:
        """float32 [N, L]: weight of the target at position t+1 predicted from position t, stored
        at t+1 (position 0 always 0): a response token whose predecessor is in the same example."""
        w = np.zeros(self.tokens.shape, np.float32)
        same = (self.segments[:, 1:] == self.segments[:, :-1]) & (self.segments[:, 1:] > 0)
        w[:, 1:] = (self.response[:, 1:] & same).astype(np.float32)
        return w


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0) -> Packed:
    """First-fit-decreasing packing into rows of exactly `seq_len`; longer examples are truncated
    to `seq_len`, examples left with no response target are dropped. Deterministic."""
    items = []
    for ids, mask in examples:
        ids, mask = ids[:seq_len], mask[:seq_len]
        if mask[1:].any():
            items.append((ids, mask))
    if not items:
        raise ValueError(f"no example has a response token within seq_len={seq_len}")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(items[i][0])
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    response = np.zeros((len(rows), seq_len), bool)
    segments = np.zeros((len(rows), seq_len), np.int32)
    for r, members in enumerate(rows):
        pos = 0
        for s, i in enumerate(sorted(members), 1):
            ids, mask = items[i]
            tokens[r, pos:pos + len(ids)] = ids
            response[r, pos:pos + len(ids)] = mask
            segments[r, pos:pos + len(ids)] = s
            pos += len(ids)
    return Packed(tokens, response, segments)


def split_examples(examples: list[dict[str, str]], val_fraction: float, seed: int, *, max_val: int = 256
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A deterministic held-out split (by seed)."""
    if val_fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(max_val, max(1, int(round(len(examples) * val_fraction))), len(examples) - 1)
    perm = np.random.default_rng([seed, 7919]).permutation(len(examples))
    val = set(perm[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val])


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 104729]).permutation(n_rows)


def rows_for_step(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of optimizer step `step` (0-based): a pure function of (seed, step). Rows are
    visited epoch by epoch, each epoch in its own seeded permutation."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(pos // n_rows):
        sel = (pos // n_rows) == epoch
        out[sel] = epoch_permutation(n_rows, seed, int(epoch))[pos[sel] % n_rows]
    return out
