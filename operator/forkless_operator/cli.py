"""``forkless-operator run``: kopf with the operator's handlers and settings.

Credentials come from the in-cluster service account, else KUBECONFIG or
~/.kube/config (kopf logs in through the ``kubernetes`` client, and so does
``forkless_operator.apply``). Peering: kopf looks for its peering object and
runs standalone, with a log line, when the peering CRDs are not installed
(``--peering NAME`` makes peering mandatory instead: kopf then waits for the
CRDs); pass ``--standalone`` to skip the look-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forkless-operator", description="The forkless InferenceService operator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="watch InferenceServices and reconcile them")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", dest="namespaces", default=[], metavar="NS",
        help="watch this namespace (repeatable; globs such as team-* work)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    run.add_argument(
        "--liveness", metavar="URL", default=None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    run.add_argument("--metrics-port", type=int, default=9090, help="port of /metrics; 0 turns it off")
    run.add_argument("--standalone", action="store_true", help="never peer with other operator instances")
    run.add_argument(
        "--peering", default=None, metavar="NAME",
        help="require this kopf peering object (HA); without it, forkless-operator is used when it exists",
    )
    run.add_argument("--log-format", choices=("json", "plain"), default="json")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    convert = commands.add_parser(
        "convert", help="turn KServe v1beta1 InferenceServices into forkless ones (YAML on stdout)",
        description="Reads KServe InferenceServices (multi-document YAML), writes forkless ones to stdout and names "
        "on stderr every field that could not be carried, with the reason. Exit 0: every manifest converted "
        "completely; 3: some fields were not carried (or a manifest not at all); 2: unreadable input.",
    )
    convert.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                         help="a YAML file, or - for standard input (repeatable)")
    return parser


def convert(args: argparse.Namespace) -> int:
    import yaml

    from forkless_operator.convert import convert as convert_one

    documents = []
    for name in args.filename:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            documents += [d for d in yaml.safe_load_all(text) if d]
        except (OSError, yaml.YAMLError) as error:
            print(f"forkless-operator convert: {name}: {error}", file=sys.stderr)
            return 2
    results = [convert_one(document) for document in documents if isinstance(document, dict)]
    converted = [r.manifest for r in results if r.manifest is not None]
    if converted:
        yaml.safe_dump_all(converted, sys.stdout, sort_keys=False)
    for result in results:
        for line in result.lost:
            print(f"{result.name}: {line}", file=sys.stderr)
    complete = sum(r.complete for r in results)
    print(f"converted {complete} of {len(results)} InferenceService(s) completely; "
          f"{len(converted) - complete} with fields not carried, {len(results) - len(converted)} not at all",
          file=sys.stderr)
    return 0 if results and complete == len(results) else 3


def run(args: argparse.Namespace) -> int:
    import kopf  # imported here so that --help works without a cluster library set up

    from forkless_operator import handlers, metrics

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    logging.getLogger(__name__).info("handlers loaded from %s", handlers.__name__)
    kopf.run(
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        liveness_endpoint=args.liveness,
        standalone=args.standalone,
        peering_name=args.peering,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "convert":
        return convert(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
