"""Runs `forkless-runtime` and, at exit, writes which heavy frameworks the front-end imported."""

from __future__ import annotations

import atexit
import json
import os
import sys

FRAMEWORKS = ("torch", "onnxruntime", "tensorflow", "jax")


def report() -> None:
    imported = sorted({name.split(".")[0] for name in sys.modules} & set(FRAMEWORKS))
    with open(os.environ["PROBE_OUT"], "w") as out:
        json.dump({"frameworks": imported}, out)


if __name__ == "__main__":
    atexit.register(report)
    from forkless_runtime.cli import main

    main()
