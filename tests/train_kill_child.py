"""The killed run of tests/test_train_kill.py: `python tests/train_kill_child.py WHERE TRAIN-FLAGS...`.

Runs `python -m qeft_jax.train TRAIN-FLAGS...` in this process with a stall injected at WHERE:
  step:N  right after step N's update is computed, before it is recorded or checkpointed
          (train()'s `after_update` hook);
  save:N  inside the orbax save of step N, after the data is written to the temporary directory and
          before it is committed (renamed): train.trainer.Checkpoints is replaced by a subclass whose
          orbax manager uses a pausing atomic-rename temporary path.
At the stall it prints `PAUSED WHERE` on stderr and sleeps, so the test can SIGKILL it exactly there.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from qeft_jax.sharding import maybe_initialize_distributed
from qeft_jax.train import parse
from train import trainer


def pause(where: str) -> None:
    print(f"PAUSED {where}", file=sys.stderr, flush=True)
    time.sleep(3600)


def install_save_pause(step: int, where: str) -> None:
    class PausingTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args: Any, **kwargs: Any) -> None:
            if Path(str(self.get_final())).name == str(step):
                pause(where)
            await super().finalize(*args, **kwargs)

    class PausingCheckpoints(trainer.Checkpoints):
        def __init__(self, root: Path, keep: int, **options: Any):
            super().__init__(root, keep, temporary_path_class=PausingTemporaryPath, **options)

    trainer.Checkpoints = PausingCheckpoints  # train() looks the class up when it runs


def main(argv: list[str]) -> None:
    maybe_initialize_distributed()  # a process of a multi-process run when the QEFT_* variables say so
    where, flags = argv[0], argv[1:]
    kind, n = where.split(":")
    step = int(n)
    after_update = None
    if kind == "step":
        def after_update(s: int) -> None:
            if s == step:
                pause(where)
    elif kind == "save":
        install_save_pause(step, where)
    else:
        raise SystemExit(f"WHERE must be step:N or save:N, got {where!r}")
    cfg, a = parse(flags)
    print(json.dumps(trainer.train(cfg, overwrite=a.overwrite, after_update=after_update)))


if __name__ == "__main__":
    main(sys.argv[1:])
