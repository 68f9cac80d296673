"""Shared CLI plumbing: one clear message and a non-zero exit instead of a traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                 NotADirectoryError, RuntimeError, KeyError)


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("QEFT_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
