"""Quantization methods as data: one pipeline runs every recipe (a method is a recipe, not a fork)."""
from __future__ import annotations

import dataclasses
from typing import Any

from qeft_jax.packing import SUPPORTED_BITS

WEAK_MODES = ("none", "global", "per_layer")
METHODS = ("rtn", "gptq", "awq", "owq", "qeft")
WEAK_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    method: str
    bits: int = 4
    group_size: int | None = 128     # None: per-channel (one group spanning the input dim)
    k: int = 16                      # weak columns per linear (0 for rtn/gptq)
    weak: str = "global"             # none | global (QEFT, Algorithm 1 + OGR) | per_layer (OWQ, Eq. 3)
    optq: bool = True                # OPTQ reconstruction after the grid search; False = RTN
    act_order: bool = False
    percdamp: float = 0.01
    grid: int = 100                  # clipping grid points (p = 1 - i/grid)
    max_shrink: float = 0.8
    storage_dtype: str = "float16"   # scales, zeros (and weak columns unless weak_dtype says otherwise)
    weak_dtype: str | None = None    # weak columns: None = storage_dtype; "float32" keeps a tuned Δ unrounded
    awq_grid: int = 0                # AWQ scale search over α = i / awq_grid, i = 0..awq_grid (0: none)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group size must be a positive multiple of 8 (or per-channel), got "
                             f"{self.group_size}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.weak not in WEAK_MODES:
            raise ValueError(f"weak must be one of {WEAK_MODES}, got {self.weak!r}")
        if self.weak == "none" and self.k:
            raise ValueError(f"method {self.method!r} keeps no weak columns; got k={self.k}")
        if self.awq_grid < 0:
            raise ValueError(f"awq_grid must be >= 0 (0: no AWQ scale search), got {self.awq_grid}")
        if self.storage_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"storage_dtype must be float16 or bfloat16, got {self.storage_dtype!r}")
        if self.weak_dtype not in (None, *WEAK_DTYPES):
            raise ValueError(f"weak_dtype must be one of {WEAK_DTYPES}, got {self.weak_dtype!r}")

    @property
    def weak_storage(self) -> str:
        """The dtype the weak columns are stored in."""
        return self.weak_dtype or self.storage_dtype

    @property
    def calibrated(self) -> bool:
        """Whether quantizing reads calibration statistics (OPTQ's Hessians, AWQ's scale search, weak
        column selection). Plain RTN does not, so the pipeline skips its calibration passes."""
        return self.optq or self.awq_grid > 0 or self.weak != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_recipe(method: str, *, bits: int = 4, group_size: int | None = 128, k: int = 16,
                **overrides: Any) -> QuantRecipe:
    """The methods of the paper's tables: RTN, GPTQ (OPTQ g128), AWQ (activation-aware input-channel
    scales folded into the model, then RTN g128: `qeft_jax.quant.awq`), OWQ (per-channel, per-layer
    weak columns), QEFT (group-wise, global weak columns + OGR)."""
    if method == "rtn":
        base = dict(weak="none", k=0, optq=False, group_size=group_size)
    elif method == "gptq":
        base = dict(weak="none", k=0, optq=True, group_size=group_size)
    elif method == "awq":
        base = dict(weak="none", k=0, optq=False, group_size=group_size, awq_grid=20)
    elif method == "owq":
        base = dict(weak="per_layer", k=k, optq=True, group_size=None)
    elif method == "qeft":
        base = dict(weak="global", k=k, optq=True, group_size=group_size)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return QuantRecipe(method=method, bits=bits, **{**base, **overrides})
