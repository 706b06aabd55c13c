"""The failure forkless exists to avoid, reproduced: warm torch in a parent, then start workers.

Usage: fork_hazard.py fork|spawn|forkserver [--device cpu|cuda]. Prints one JSON line with what
each child did ("ok", "hung" or the error), and exits 0 either way: the caller judges.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time

import torch


def child_matmul(device: str, queue: mp.Queue) -> None:
    try:
        a = torch.randn(512, 512, device=device)
        (a @ a).sum().item()
        queue.put("ok")
    except Exception as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def main() -> None:
    method = sys.argv[1]
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    torch.set_num_threads(max(2, torch.get_num_threads()))
    a = torch.randn(512, 512, device=device)
    (a @ a).sum().item()  # the parent warms the model: OpenMP pool or CUDA context now exists
    context = mp.get_context(method)
    queue = context.Queue()
    children = [context.Process(target=child_matmul, args=(device, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = []
    deadline = time.monotonic() + 10
    for _ in children:
        try:
            results.append(queue.get(timeout=max(0.1, deadline - time.monotonic())))
        except Exception:
            results.append("hung")
    for child in children:
        child.join(timeout=1)
        if child.is_alive():
            child.kill()
    print(json.dumps({"method": method, "device": device, "children": results}))


if __name__ == "__main__":
    main()
