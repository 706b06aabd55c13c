"""`forkless-runtime serve|check`: the runtime's command line. Imports no framework that touches CUDA."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

from .logs import configure_logging
from .settings import FLAGS, Settings, add_flags, env_name, flag_name, settings_from_args


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
    return parser


def check_model(settings: Settings) -> int:
    """Load the model in a spawned worker exactly as `serve` would, then report and exit."""
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
    settings = settings_from_args(args, parser)
    configure_logging(settings.log_format, settings.log_level)
    multiprocessing.set_start_method(settings.start_method, force=True)
    if args.command == "check":
        sys.exit(check_model(settings))
    from .frontend.server import serve

    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
