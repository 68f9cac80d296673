"""The measuring child of tests/test_quant_memory.py: `python tests/quant_memory_child.py WORKDIR`.

Quantizes small synthetic checkpoints (random bf16 weights) with `quantize_checkpoint` under
tracemalloc, which numpy reports every array allocation to, so the peak of the pipeline's host
arrays is counted exactly (XLA's own buffers are not: they are the same for every run here). One
warm-up run first compiles every program, so the measured peaks hold no compilation. Prints one
JSON line: per activations mode, the peak bytes of (2 blocks, few sequences), (10 blocks, few
sequences), (2 blocks, many sequences) and the bytes still allocated when the final write starts
(10 blocks); the bytes of one packed block and of one float32 copy of the extra sequences'
activations.
"""
from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qeft_jax import spec
from qeft_jax.checkpoint import write_fp
from qeft_jax.config import ModelConfig
from qeft_jax.io import SafetensorsReader
from qeft_jax.quant import pipeline
from qeft_jax.quant.pipeline import quantize_checkpoint
from qeft_jax.recipes import make_recipe

FEW, MANY, SEQ = 4, 256, 64
RECIPE = make_recipe("qeft", k=8, group_size=64)


def fp_checkpoint(root: Path, layers: int) -> tuple[Path, ModelConfig]:
    cfg = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    out = root / f"fp{layers}"
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    write_fp(out, cfg.to_hf_dict(), {
        k: (np.ones(s) if k.endswith("norm.weight") else rng.standard_normal(s) * 0.05).astype(ml_dtypes.bfloat16)
        for k, s in spec.fp_shapes(cfg).items()})
    return out, cfg


def peak(src: Path, cfg: ModelConfig, samples: int, out: Path, activations: str) -> tuple[int, int]:
    """(peak bytes of host allocations during one quantization, bytes allocated when its final
    write starts), both above what was allocated before it."""
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (samples, SEQ))
    at_write = []
    write = pipeline.write_quantized

    def watched_write(*args: Any, **kwargs: Any) -> None:
        at_write.append(tracemalloc.get_traced_memory()[0] - before)
        write(*args, **kwargs)
    pipeline.write_quantized = watched_write
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        quantize_checkpoint(src, out, RECIPE, ids, batch_size=8, progress=False, overwrite=True,
                            activations=activations)
    finally:
        pipeline.write_quantized = write
    return tracemalloc.get_traced_memory()[1] - before, at_write[0]


def main(root: Path) -> None:
    two, cfg = fp_checkpoint(root, 2)
    ten, _ = fp_checkpoint(root, 10)
    tracemalloc.start()
    peak(ten, cfg, FEW, root / "warm", "float32")
    res: dict[str, Any] = {}
    for mode in ("float32", "disk"):
        ten_blocks, at_write = peak(ten, cfg, FEW, root / "q10", mode)
        res[mode] = {"blocks_2": peak(two, cfg, FEW, root / "q", mode)[0], "blocks_10": ten_blocks,
                     "blocks_10_at_write": at_write, "many_sequences": peak(two, cfg, MANY, root / "q", mode)[0]}
    block = SafetensorsReader([root / "q" / "model.safetensors"])
    res["packed_block_bytes"] = sum(int(block.get(k).nbytes) for k in block.keys()
                                    if spec.layer_of(k) == 0 or k == spec.PERM_TENSORS["ffn"].format(i=0))
    res["extra_activation_bytes"] = (MANY - FEW) * SEQ * cfg.hidden_size * 4
    print(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
