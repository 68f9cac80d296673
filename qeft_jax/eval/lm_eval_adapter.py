"""qeft-jax models inside the lm-evaluation-harness (`pip install qeft-jax[lm-eval]`).

Importing this module registers the model type "qeft-jax" with lm-eval:

    import qeft_jax.eval.lm_eval_adapter  # noqa: F401  (registers "qeft-jax")
    lm_eval.simple_evaluate(model="qeft-jax", model_args="pretrained=default", tasks=[...])

or pass an instance: `simple_evaluate(model=QeftJaxLM(pretrained=DIR), ...)`.

loglikelihood uses the same tokenisation and jitted, bucketed scoring as `qeft_jax.eval.tasks`
(see its docstring); loglikelihood_rolling scores a whole text in windows of max_length tokens,
each token predicted once with as much preceding context as fits; generate_until decodes greedily
with `qeft_jax.generation.generate` (pad and stop ids from `qeft_jax.tokenization`) and cuts the
text at the first `until` string.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from qeft_jax import tokenization
from qeft_jax.eval import tasks as T
from qeft_jax.generation import completion_text, generate
from qeft_jax.load import load_model


def _as_int(value: Any, name: str, default: int | None) -> int | None:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, not {value!r}") from None


@register_model("qeft-jax", "qeft_jax")
class QeftJaxLM(LM):
    """An lm-eval `LM` over a qeft-jax checkpoint (fp or quantized).

    pretrained: "default" or a checkpoint directory (ignored when `model` and `tokenizer` are
    given). batch_size: sequences per scoring batch ("auto" -> 8). max_length: context tokens
    (default: the model's max_position_embeddings). max_gen_toks: default generation length.
    """

    def __init__(self, pretrained: str = "default", batch_size: int | str | None = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 model: Any = None, tokenizer: Any = None, progress: bool | str = False,
                 **_ignored: Any) -> None:  # device, max_batch_size, ... from lm-eval's CLI
        super().__init__()
        if model is None:
            model, loaded_tok, _ = load_model(pretrained)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if tokenizer is None:
            raise ValueError(f"model {pretrained} has no tokenizer files; lm-eval needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained)
        self.batch_size = _as_int(batch_size, "batch_size", 8)
        self.max_length = T._max_length(model, _as_int(max_length, "max_length", None))
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", 256)
        self.progress = str(progress).lower() in ("1", "true", "yes")
        self._pairs = T.PairEncoder(tokenizer)

    # ------------------------------------------------------------------ lm-eval API
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.pretrained).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args[:2]) for req in requests]
        return T.loglikelihoods(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                                max_length=self.max_length, progress=self.progress and not disable_tqdm,
                                desc="loglikelihood")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        token_reqs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            for ctx, cont in self.rolling_windows(req.args[0]):
                token_reqs.append((ctx, cont))
                owner.append(r)
        scores = T.score_tokens(self.model, token_reqs, batch_size=self.batch_size,
                                max_length=self.max_length,
                                progress=self.progress and not disable_tqdm, desc="rolling")
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        return totals

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Token requests covering every token of text once: chunks of up to max_length predicted
        tokens, each given all preceding tokens (score_tokens keeps the last max_length of them)."""
        if self._pairs.empty_prefix is None:
            raise ValueError("loglikelihood_rolling needs a BOS or EOS token to condition the first "
                             "token on")
        seq = [self._pairs.empty_prefix] + self._pairs.encode(text)
        return [(seq[:a], seq[a:a + self.max_length]) for a in range(1, len(seq), self.max_length)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        stops = tokenization.stop_ids(self.tokenizer, self.model.config)
        pad = tokenization.pad_id(self.tokenizer, self.model.config)
        eos_text = getattr(self.tokenizer, "eos_token", None)
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            new = _as_int(kwargs.pop("max_gen_toks", None), "max_gen_toks", self.max_gen_toks)
            new = max(0, min(new, self.max_length - 1))
            ids = (self._pairs.prefix + self._pairs.encode(context)) if context else []
            if not ids:
                ids = [self._pairs.empty_prefix if self._pairs.empty_prefix is not None else pad]
            ids = ids[-(self.max_length - new):]
            groups[(new, tuple(until))].append((i, ids))
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until",
                   disable=not self.progress or disable_tqdm)
        for (new, until), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                rows = generate(self.model, [ids for _, ids in chunk], max_new_tokens=new,
                                temperature=0.0, stop_tokens=stops, pad_id=pad)
                for (i, _), row in zip(chunk, rows):
                    out[i] = cut_at_strings(completion_text(self.tokenizer, row, stops), until)
                bar.update(len(chunk))
        bar.close()
        return out


def cut_at_strings(text: str, until: Any) -> str:
    """text up to (not including) the earliest occurrence of any of the until strings."""
    cut = len(text)
    for s in until:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]
