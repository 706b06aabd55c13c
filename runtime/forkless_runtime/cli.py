"""`forkless-runtime serve|check|fetch|flags`: the runtime's command line. Imports no framework that touches CUDA."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

from .logs import configure_logging
from .settings import (
    FLAGS,
    MODEL_FORMATS,
    PRECISIONS,
    Settings,
    add_flags,
    env_name,
    flag_name,
    settings_from_args,
)

# The names `plan --gpu` takes (forkless_runtime.planning.GPUS holds their memory; kept here so that
# the command line is built without importing torch).
GPU_NAMES = ("h100-80gb", "h200", "a100-80gb", "a100-40gb", "l40s", "l4", "t4", "mig-1g.10gb", "mig-3g.40gb")

# KServe's storage initializer has none and hangs on a stalled download (kserve#5611); 30 minutes
# fits a 70B model at a modest 100 MiB/s and still ends.
DOWNLOAD_TIMEOUT_S = 1800.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkless-runtime",
        description="Spawn-safe multi-worker model server: KServe V1 and Open Inference Protocol V2 over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP with spawned workers")
    add_flags(serve)
    check = commands.add_parser("check", help="load the model once in a spawned worker and exit 0, or print why not")
    add_flags(check)
    commands.add_parser("flags", help="print every flag with its environment variable")
    fetch = commands.add_parser(
        "fetch", help="download a model (s3://, gs://, hf://, http(s)://) into a directory, or say why not",
        description="Downloads in bounded memory, verifies size and ETag, renames into place, retries transient "
        "failures, and gives up after --timeout-s with ModelDownloadFailed in the termination log.",
    )
    fetch.add_argument("uri", help="the model's URI (a single object, a prefix, or a Hugging Face repository)")
    fetch.add_argument("destination", help="the directory to download into (created)")
    fetch.add_argument("--timeout-s", type=float, default=DOWNLOAD_TIMEOUT_S,
                       help=f"give up after this many seconds in all (default {DOWNLOAD_TIMEOUT_S:g})")
    fetch.add_argument("--cache", metavar="DIR",
                       help="keep the download in DIR (a shared volume) under the URI and version, link it into "
                       "the destination, and download nothing when that version is already there")
    plan = commands.add_parser(
        "plan", help="how much memory one worker needs and how many fit on a GPU, computed on a CPU",
        description="Counts the parameters and traces the forward on meta or fake tensors (nothing is allocated) at "
        "batch 1 and at the largest batch; adds the CUDA context; says how many workers fit on the GPU named.",
    )
    plan.add_argument("--model-uri", default="", help="the model file (a path or file:// URI)")
    plan.add_argument("--format", choices=MODEL_FORMATS, help="inferred from the extension when not given")
    plan.add_argument("--handler", help="module:Class of a Python handler that declares its memory (format python)")
    plan.add_argument("--precision", choices=PRECISIONS, default="fp32")
    plan.add_argument("--max-batch-size", type=int, default=32, help="the largest batch (default 32)")
    plan.add_argument("--input-shapes", help="per-sample input shapes, e.g. 3x64x64 (TorchScript needs them)")
    target = plan.add_mutually_exclusive_group()
    target.add_argument("--gpu", choices=sorted(GPU_NAMES), help="a GPU by name")
    target.add_argument("--gpu-memory", help="a GPU's total memory, e.g. 80GiB or 81559MiB")
    plan.add_argument("--output", choices=("text", "json"), default="text")
    tune = commands.add_parser(
        "tune", help="sweep workers x batch size x batch delay under load on this machine; print the best under a p99",
        description="Starts `serve` for each configuration, loads it at each concurrency with its own HTTP client, "
        "and prints throughput, p50/p99 and memory per worker, then the best configuration whose p99 is within "
        "--p99-ms as an InferenceService runtime: block.",
    )
    tune.add_argument("--model-uri", help="the model file (a path or file:// URI)")
    tune.add_argument("--model-name", default="model")
    tune.add_argument("--format", choices=MODEL_FORMATS)
    tune.add_argument("--handler", help="module:Class for --format python")
    tune.add_argument("--precision", choices=PRECISIONS)
    tune.add_argument("--device", choices=("auto", "cpu", "cuda"))
    tune.add_argument("--input-shapes", help="per-sample input shapes when the model declares none, e.g. 3x64x64")
    tune.add_argument("--workers", type=_int_list, help="worker counts to try (default: 1 and the usable CPUs, "
                      "or 1, 2 and 4 per GPU)")
    tune.add_argument("--max-batch-size", type=_int_list, default=[1, 8, 32], help="default 1,8,32")
    tune.add_argument("--max-batch-delay-ms", type=_float_list, default=[2.0], help="default 2")
    tune.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="connections; default 1,8,32")
    tune.add_argument("--duration-s", type=float, default=5.0, help="seconds of load per cell (default 5)")
    tune.add_argument("--p99-ms", type=float, default=100.0, help="the p99 budget the best must keep (default 100)")
    tune.add_argument("--output", choices=("text", "json"), default="text")
    return parser


def _number_list(convert: Callable[[str], float], least: float) -> Callable[[str], list[Any]]:
    """A parser of "1,2,4": numbers separated by commas, each at least ``least``."""

    def parse(text: str) -> list[Any]:
        try:
            values = [convert(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be numbers separated by commas, e.g. 1,2,4; got {text!r}") from None
        if any(not v >= least for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {least:g}, got {text!r}")
        return values

    return parse


_int_list = _number_list(int, 1)
_float_list = _number_list(float, 0)


def tune_model(args: argparse.Namespace) -> int:
    """Run the sweep; print progress to stderr and the table (or JSON) to stdout."""
    import json

    from .pool.resources import usable_cpus, visible_gpus
    from .tune import best, configs, render_table, report, run

    if not args.model_uri and not args.handler:
        print("forkless-runtime tune: --model-uri (or --handler) is required", file=sys.stderr)
        return 2
    serve_args = ["--model-name", args.model_name]
    for flag in ("model_uri", "format", "handler", "precision", "device", "input_shapes"):
        if getattr(args, flag):
            serve_args += [flag_name(flag), getattr(args, flag)]
    gpus = len(visible_gpus()) if args.device != "cpu" else 0
    workers = args.workers or sorted({1, 2 * gpus, 4 * gpus} - {0} if gpus else {1, usable_cpus()})
    grid = configs(workers, args.max_batch_size, args.max_batch_delay_ms)
    print(f"tuning {len(grid)} configuration(s) x {len(args.concurrency)} concurrency level(s), "
          f"{args.duration_s:g} s each", file=sys.stderr)
    try:
        cells = run(serve_args, args.model_name, grid, args.concurrency, args.duration_s, args.input_shapes,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (RuntimeError, ValueError, OSError) as error:
        print(f"forkless-runtime tune: {error}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(report(cells, args.p99_ms), indent=2))
    else:
        print(render_table(cells, best(cells, args.p99_ms), args.p99_ms))
    return 0


def plan_model(args: argparse.Namespace) -> int:
    """Print the plan, or the reason it cannot be made (exit 1)."""
    import json
    import os

    from .settings import EXTENSION_FORMATS

    path = args.model_uri.removeprefix("file://")
    fmt = args.format or ("python" if args.handler else EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower()))
    try:
        if fmt is None:
            raise ValueError(f"cannot infer the format of {path}: give --format")
        from .planning import parse_memory, plan, render_text

        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        result = plan(path, fmt, args.precision, args.max_batch_size, args.input_shapes, args.gpu, memory,
                      args.handler)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"forkless-runtime plan: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), indent=2) if args.output == "json" else render_text(result))
    return 0


def fetch_model(uri: str, destination: str, timeout_s: float, cache: str | None = None) -> int:
    """The init container's command: exit 0 with the model in place, or 1 with the reason reported."""
    import logging
    import os

    from .storage.fetch import DownloadFailed, fetch, watchdog
    from .storage.uris import InvalidModelUri
    from .termination import MODEL_DOWNLOAD_FAILED, report_termination

    log = logging.getLogger("forkless.fetch")

    def fail(message: str) -> None:
        log.error("%s: %s", MODEL_DOWNLOAD_FAILED, message)
        report_termination(MODEL_DOWNLOAD_FAILED, message)

    def expire() -> None:
        fail(f"{uri}: the download did not finish within {timeout_s:g}s (model.downloadTimeoutSeconds)")
        os._exit(1)  # the download threads may sit in a read; nothing is left to save

    timer = watchdog(timeout_s, expire)
    try:
        report = fetch(uri, destination, timeout_s, cache)
    except (DownloadFailed, InvalidModelUri, OSError) as error:
        fail(str(error))
        return 1
    finally:
        timer.cancel()
    if report.cached:
        log.info("found %d file(s), %.1f MiB in the cache %s: nothing downloaded; linked into %s",
                 len(report.files), report.bytes / (1 << 20), cache, destination)
    else:
        log.info("fetched %d file(s), %.1f MiB in %.2fs (%.1f MiB/s) into %s", len(report.files),
                 report.bytes / (1 << 20), report.seconds, report.megabytes_per_s, cache or destination)
    return 0


def check_model(settings: Settings) -> int:
    """Load each model in a spawned worker exactly as `serve` would, one after the other, then report and exit."""
    from .frontend.models import served_settings

    try:
        models = served_settings(settings)
    except ValueError as error:
        print(f"forkless-runtime check: {error}", file=sys.stderr)
        return 1
    return max(_check_one(model) for model in models)


def _check_one(settings: Settings) -> int:
    import asyncio

    from .batching.batcher import Batcher
    from .pool.metrics import NullMetrics
    from .pool.supervisor import WorkerPool

    async def run() -> int:
        failure: list[str] = []
        batcher = Batcher(1, 0, 1)
        pool = WorkerPool(settings.replace(workers=1, max_load_attempts=1), batcher, NullMetrics(), failure.append)
        started = time.perf_counter()
        await pool.start()
        while pool.metadata is None and not failure:
            await asyncio.sleep(0.05)
        await pool.stop()
        if failure:
            print(f"forkless-runtime check: {failure[0]}", file=sys.stderr)
            return 1
        print(f"ok: {settings.model_name} ({settings.resolved_format}) loaded in {time.perf_counter() - started:.2f}s; "
              f"metadata: {pool.metadata}")
        return 0

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "flags":
        for flag in FLAGS:
            print(f"{flag_name(flag.field):28} {env_name(flag.field):34} {flag.help}")
        return
    if args.command == "plan":
        sys.exit(plan_model(args))
    if args.command == "tune":
        sys.exit(tune_model(args))
    if args.command == "fetch":
        configure_logging("text", "info")
        sys.exit(fetch_model(args.uri, args.destination, args.timeout_s, args.cache))
    settings = settings_from_args(args, parser)
    configure_logging(settings.log_format, settings.log_level)
    multiprocessing.set_start_method(settings.start_method, force=True)
    if args.command == "check":
        sys.exit(check_model(settings))
    from .frontend.server import serve

    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
