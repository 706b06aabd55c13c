"""The last word of a container that gives up: ``<Reason>: <message>`` in Kubernetes' termination log.

The kubelet copies /dev/termination-log into the pod's status (``lastState.terminated.message``),
where the operator reads it and turns the reason into the InferenceService's Ready condition: the
user sees why in ``kubectl get``, not a bare CrashLoopBackOff. Outside a container the file does not
exist and nothing is written.
"""

from __future__ import annotations

import contextlib
import os
import re

TERMINATION_LOG = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a termination message.
MESSAGE_LIMIT = 4096

MODEL_DOWNLOAD_FAILED = "ModelDownloadFailed"
MODEL_LOAD_FAILED = "ModelLoadFailed"
MODEL_OUT_OF_MEMORY = "ModelOutOfMemory"
REASONS = (MODEL_DOWNLOAD_FAILED, MODEL_LOAD_FAILED, MODEL_OUT_OF_MEMORY)

_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError|can't allocate memory|Cannot allocate memory|"
                            r"failed to allocate|MemoryError", re.IGNORECASE)


def load_failure_reason(message: str) -> str:
    """ModelOutOfMemory when the loader ran out of (GPU or host) memory, else ModelLoadFailed."""
    return MODEL_OUT_OF_MEMORY if _OUT_OF_MEMORY.search(message) else MODEL_LOAD_FAILED


def termination_message(reason: str, message: str) -> str:
    text = f"{reason}: {message.strip()}"
    encoded = text.encode()[:MESSAGE_LIMIT]
    return encoded.decode(errors="ignore")


def report_termination(reason: str, message: str, path: str = TERMINATION_LOG) -> bool:
    """Write the termination message where Kubernetes looks for it; False outside a container (the
    kubelet creates the file; it is never created here, so a process on a host writes nothing)."""
    if not os.path.isfile(path):
        return False
    with contextlib.suppress(OSError), open(path, "w") as log:
        log.write(termination_message(reason, message))
        return True
    return False
