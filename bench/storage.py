#!/usr/bin/env python3
"""Model download against the storage server's own speed, side by side in one run.

moto's S3 server on 127.0.0.1 holds one object of ``--size-mib`` (1 GiB by default). Measured:
- the server's raw throughput: the best of one plain GET and ``--readers`` parallel ranged GETs,
  each by curl into /dev/null (no client work beyond the socket);
- ``forkless-runtime fetch s3://...`` into a temporary directory, as the init container runs it:
  its throughput, the ratio to the raw figure (goal at least 0.8), and its peak RSS (goal under
  256 MiB whatever the model's size) from the kernel's accounting of that one process (wait4).

Writes bench/results/storage-latest.{json,md}.

    .venv/bin/python bench/storage.py [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.storage_servers import MotoS3  # noqa: E402 - the same server the tests use

RESULTS = REPO / "bench" / "results"
KEY = "bench/model.pt"


def raw_get(endpoint: str, size: int, readers: int, output: str = "/dev/null") -> float:
    """Seconds for curl to read the whole object into ``output``: one GET (readers=1) or ``readers``
    ranges at once."""
    url = f"{endpoint}/models/{KEY}"
    bounds = [(size * i // readers, size * (i + 1) // readers - 1) for i in range(readers)]
    started = time.perf_counter()

    def one(bound: tuple[int, int]) -> None:
        subprocess.run(["curl", "-sf", "-o", output, "-r", f"{bound[0]}-{bound[1]}", url], check=True)

    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(one, bounds))
    return time.perf_counter() - started


def fetch(s3: MotoS3, destination: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one forkless-runtime fetch process."""
    shutil.rmtree(destination, ignore_errors=True)
    env = {**os.environ, **s3.env()}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "forkless_runtime.cli", "fetch", f"s3://models/{KEY}",
                                str(destination)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"fetch failed: {process.stderr.read().decode() if process.stderr else ''}")
    return seconds, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--readers", type=int, default=8)
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="forkless-storage-bench-") as scratch:
        work = Path(scratch)
        s3 = MotoS3(authenticate=False).start()  # unsigned reads for curl: the raw figure measures the server
        try:
            source = work / "object.bin"
            with source.open("wb") as out:
                for _ in range(args.size_mib):
                    out.write(os.urandom(1 << 20))
            s3.put(KEY, source)
            source.unlink()
            rows = []
            for run in range(args.runs):
                single = raw_get(f"http://127.0.0.1:{s3.port}", size, 1)
                parallel = raw_get(f"http://127.0.0.1:{s3.port}", size, args.readers)
                os.sync()  # no write-back of an earlier step's pages during the next one
                to_disk = raw_get(f"http://127.0.0.1:{s3.port}", size, 1, str(work / "curl.bin"))
                (work / "curl.bin").unlink()
                os.sync()
                seconds, rss = fetch(s3, work / "dest")
                got = (work / "dest" / "model.pt").stat().st_size
                assert got == size, f"fetched {got} bytes of {size}"
                shutil.rmtree(work / "dest")
                os.sync()
                raw = size / min(single, parallel)
                rows.append({"run": run + 1, "raw_single_mib_s": size / single / (1 << 20),
                             "raw_parallel_mib_s": size / parallel / (1 << 20),
                             "raw_to_disk_mib_s": size / to_disk / (1 << 20),
                             "fetch_mib_s": size / seconds / (1 << 20), "ratio": size / seconds / raw,
                             "ratio_to_disk": to_disk / seconds, "fetch_peak_rss_mib": rss / (1 << 20)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            s3.stop()
    best = max(rows, key=lambda row: row["ratio"])
    median_ratio = sorted(row["ratio"] for row in rows)[len(rows) // 2]
    median_to_disk = sorted(row["ratio_to_disk"] for row in rows)[len(rows) // 2]
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
              "cpus": os.cpu_count(), "size_mib": args.size_mib, "readers": args.readers, "runs": rows,
              "median_ratio": median_ratio, "median_ratio_to_disk": median_to_disk, "peak_rss_mib": max(row["fetch_peak_rss_mib"] for row in rows)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "storage-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Model download: forkless-runtime fetch against the S3 server's raw throughput",
        "",
        f"{result['when']}, {result['cpus']} CPUs, one {args.size_mib} MiB object on moto's S3 server "
        f"(127.0.0.1), {args.runs} runs. Raw: the best of one curl GET and {args.readers} parallel ranged curl "
        "GETs into /dev/null; raw to disk: one curl GET into a file on the same disk as the fetch. "
        "Goals: fetch/raw at least 0.8, peak RSS under 256 MiB.",
        "",
        "| run | raw, one GET (MiB/s) | raw, parallel ranges (MiB/s) | raw, one GET to disk (MiB/s) | fetch (MiB/s) "
        "| fetch / raw | fetch / raw to disk | fetch peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['run']} | {r['raw_single_mib_s']:.0f} | {r['raw_parallel_mib_s']:.0f} | {r['raw_to_disk_mib_s']:.0f} | "
              f"{r['fetch_mib_s']:.0f} | {r['ratio']:.2f} | {r['ratio_to_disk']:.2f} | {r['fetch_peak_rss_mib']:.0f} |"
              for r in rows]
    lines += ["", f"Median fetch/raw {median_ratio:.2f} (best {best['ratio']:.2f}), fetch/raw to disk "
              f"{median_to_disk:.2f}; peak RSS {result['peak_rss_mib']:.0f} MiB.", ""]
    (RESULTS / "storage-latest.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
