"""Tokenization: the one place where text becomes token ids and where the tokenizer's rules live.

Corpora (`qeft_jax.data`), fine-tuning data (`train.data`), generation (`qeft_jax.generation`) and
task scoring (`qeft_jax.eval`) all go through these functions, so they agree on every rule:

    load_tokenizer(path)                  a checkpoint's tokenizer (Hugging Face files), None if absent
    import_transformers()                 transformers, for its tokenizer classes, without its banner
    encode(tok, text, add_special=...)    token ids of a text, with or without the tokenizer's own
                                          special tokens (BOS for Llama-style tokenizers)
    adds_bos(tok), prefix_ids(tok)        whether ordinary text starts with BOS; the ids put before a
                                          scored sequence (and the one id before an empty one)
    has_chat_template(tok)                whether the tokenizer renders chat conversations
    pad_id(tok, config), stop_ids(tok, config)   padding id and the ids that end generation
    prompt_text / prompt_ids(tok, instruction, input)   the instruction prompt (text / ids), as
                                          fine-tuning trains on it and generation sends it;
                                          batch_prompt_ids(tok, prompts) for a batch of prompts
    example_ids(tok, instruction, input, output)  (prompt ids, response ids) of a training example

Prompt styles (PROMPT_STYLES), one rule for training and generation:
    "chat"    the tokenizer's chat template: one user turn (the instruction, then "\\n\\n" + input
              when there is one) rendered with add_generation_prompt=True and encoded without
              special tokens (the template writes its own); the response is what rendering the
              conversation with the assistant turn adds after that prompt (answer + end-of-turn).
    "alpaca"  the Alpaca prompt (ALPACA_PROMPT, or ALPACA_PROMPT_INPUT with an input) encoded with
              the tokenizer's special tokens; the response is the output and the eos id.
    "raw"     the instruction (then "\\n\\n" + input) as plain text with special tokens, for plain
              completion (`python -m qeft_jax.generate --no-chat`); the response as for "alpaca".
style=None is "chat" when the tokenizer has a chat template and "alpaca" otherwise: fine-tuning
(train.data.encode_example) and generate_text both default to it, so a model fine-tuned here is
prompted at generation time exactly as it was trained.

transformers is imported only by `import_transformers`, when a tokenizer is loaded or built
(only tokenizers need it, and its import costs a second or more of every CLI's startup); code that
needs transformers' tokenizer classes (e.g. `convert.gguf_file`) imports it through that function
too. On an install without torch that import prints "PyTorch was not found. Models won't be
available ..." through transformers' `warning_advice`, which honours
TRANSFORMERS_NO_ADVISORY_WARNINGS: the variable is set for that import only.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Sequence

PROMPT_STYLES = ("chat", "alpaca", "raw")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                       "provides further context. Write a response that appropriately completes the "
                       "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                       "### Response:\n")
INPUT_SEP = "\n\n"  # between instruction and input in a chat turn or a raw prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one marks a directory with a tokenizer
_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


# ----------------------------------------------------------------------------------------------
# loading

def import_transformers() -> Any:
    """The transformers module, imported without its torch-free banner (see the module docstring).
    For tokenizers only: the banner is about transformers' models, which nothing here uses."""
    if "transformers" not in sys.modules:
        before = os.environ.get(_NO_ADVICE)
        os.environ[_NO_ADVICE] = "1"
        try:
            # function-local: keeps `import qeft_jax...` and every CLI's startup fast
            import transformers  # noqa: F401
        finally:
            if before is None:
                os.environ.pop(_NO_ADVICE, None)
            else:
                os.environ[_NO_ADVICE] = before
    return sys.modules["transformers"]


def load_tokenizer(path: str | Path) -> Any | None:
    """The Hugging Face tokenizer saved in a checkpoint directory; None when it has no tokenizer
    files (tokenizer.json or tokenizer.model)."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return import_transformers().AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------
# text -> ids

_TAKES_ADD_SPECIAL: dict[type, bool] = {}


def _takes_add_special(tokenizer: Any) -> bool:
    kind = type(tokenizer)
    if kind not in _TAKES_ADD_SPECIAL:
        try:
            params = inspect.signature(tokenizer.encode).parameters.values()
            _TAKES_ADD_SPECIAL[kind] = any(p.name == "add_special_tokens" or p.kind is p.VAR_KEYWORD
                                           for p in params)
        except (TypeError, ValueError):
            _TAKES_ADD_SPECIAL[kind] = False
    return _TAKES_ADD_SPECIAL[kind]


def encode(tokenizer: Any, text: str, *, add_special: bool) -> list[int]:
    """Token ids of text. add_special: whether the tokenizer adds its own special tokens (BOS for
    Llama-style tokenizers). A tokenizer whose encode() takes only the text is called with it alone
    (it then decides). A raw `tokenizers.Encoding` result is read through its .ids."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(text) method")
    if _takes_add_special(tokenizer):
        out = tokenizer.encode(text, add_special_tokens=add_special)
    else:
        out = tokenizer.encode(text)
    return [int(t) for t in getattr(out, "ids", out)]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of ordinary text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = encode(tokenizer, "a", add_special=True)
    return bool(ids) and ids[0] == bos


def prefix_ids(tokenizer: Any) -> tuple[list[int], int | None]:
    """(ids put before every scored context: [BOS] when the tokenizer adds BOS to text, else none;
    the one id put before an empty context when there are none: BOS, else EOS, else None)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if adds_bos(tokenizer):
        return [int(bos)], int(bos)
    for cand in (bos, getattr(tokenizer, "eos_token_id", None)):
        if cand is not None:
            return [], int(cand)
    return [], None


# ----------------------------------------------------------------------------------------------
# special ids

def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer has a chat template it can render (`apply_chat_template`)."""
    return bool(getattr(tokenizer, "chat_template", None)) and callable(
        getattr(tokenizer, "apply_chat_template", None))


def _config_eos(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(tokenizer: Any | None, config: Any | None = None) -> int:
    """The padding id: the first of the tokenizer's pad id, the model config's pad id, the
    tokenizer's eos id and the config's eos ids that exists; else 0. Padding is masked everywhere,
    so the choice only has to be a valid id."""
    cands = [getattr(tokenizer, "pad_token_id", None),
             getattr(config, "pad_token_id", None) if config is not None else None,
             getattr(tokenizer, "eos_token_id", None), *_config_eos(config)]
    return next((int(c) for c in cands if c is not None), 0)


def stop_ids(tokenizer: Any | None, config: Any | None = None) -> tuple[int, ...]:
    """The ids that end generation, sorted: the model config's eos ids and the tokenizer's eos id."""
    stops = set(_config_eos(config))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        stops.add(int(eos))
    return tuple(sorted(stops))


# ----------------------------------------------------------------------------------------------
# the instruction prompt (training and generation)

def prompt_style(tokenizer: Any, style: str | None = None) -> str:
    """The style a prompt is built in: `style`, or for None "chat" with a chat template, else
    "alpaca". "chat" for a tokenizer without a chat template is an error."""
    if style is None:
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)} or None, not {style!r}")
    if style == "chat" and not has_chat_template(tokenizer):
        raise ValueError("prompt style 'chat' but the tokenizer has no chat template")
    return style


def _user_text(instruction: str, input: str) -> str:
    return instruction + (INPUT_SEP + input if input else "")


def _chat_prompt(tokenizer: Any, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)


def prompt_text(tokenizer: Any, instruction: str, input: str = "", *, style: str | None = None) -> str:
    """The prompt as text (see the module docstring); `prompt_ids` encodes it."""
    style = prompt_style(tokenizer, style)
    if style == "chat":
        return _chat_prompt(tokenizer, _user_text(instruction, input))
    if style == "alpaca":
        return (ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT).format(instruction=instruction, input=input)
    return _user_text(instruction, input)


def prompt_ids(tokenizer: Any, instruction: str, input: str = "", *, style: str | None = None) -> list[int]:
    """Token ids of the prompt for an instruction (and optional input): what fine-tuning puts before
    each response and what generation feeds the model. style: see the module docstring."""
    style = prompt_style(tokenizer, style)
    return encode(tokenizer, prompt_text(tokenizer, instruction, input, style=style),
                  add_special=style != "chat")


def example_ids(tokenizer: Any, instruction: str, input: str, output: str, *, style: str | None = None
                ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one instruction example; the prompt is `prompt_ids`'s."""
    style = prompt_style(tokenizer, style)
    prompt = prompt_ids(tokenizer, instruction, input, style=style)
    if style == "chat":
        user = _user_text(instruction, input)
        head = _chat_prompt(tokenizer, user)
        full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": output}], tokenize=False)
        return prompt, encode(tokenizer, full[len(head):] if full.startswith(head) else output,
                              add_special=False)
    response = encode(tokenizer, output, add_special=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    return prompt, response + ([int(eos)] if eos is not None else [])


def batch_prompt_ids(tokenizer: Any, prompts: Sequence[str], *, style: str | None = None) -> list[list[int]]:
    """`prompt_ids` of each text prompt (an instruction without input)."""
    style = prompt_style(tokenizer, style)
    return [prompt_ids(tokenizer, p, style=style) for p in prompts]
