#!/usr/bin/env python3
"""Write crds/ from the pydantic models in operator/forkless_operator/spec.py.

Usage: hack/gen-crds.py            write crds/serving.forkless.dev_inferenceservices.yaml
       hack/gen-crds.py --check    exit 1 if that file differs from what the models generate
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from forkless_operator.crd import CRD_FILENAME, render_yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / CRD_FILENAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the file is stale instead of writing it")
    args = parser.parse_args()

    wanted = render_yaml()
    current = CRD_PATH.read_text() if CRD_PATH.exists() else ""
    if args.check:
        if current == wanted:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True),
            fromfile=str(CRD_PATH.relative_to(ROOT)), tofile="generated from spec.py",
        )
        sys.stderr.writelines(diff)
        sys.stderr.write(f"{CRD_PATH.relative_to(ROOT)} is stale: run hack/gen-crds.py\n")
        return 1
    CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
    CRD_PATH.write_text(wanted)
    print(f"wrote {CRD_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
