#!/usr/bin/env bash
# Install, or reuse, the storage servers the tests download models from, and print the path of
# moto_server (an S3 API server; moto 5.2 in server mode, with IAM so a wrong key gets a real 403).
#
# moto lives in a virtual environment of its own, cached outside the repository and keyed by the
# hash of its pins: its botocore needs python-dateutil<3 and the project's kubernetes client >=3,
# so the two cannot share .venv.
#
# Usage: hack/storage-servers.sh     prints the moto_server path on stdout
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pins=$root/hack/storage-servers
cache=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}
digest=$(cat "$pins/requirements.in" "$pins/constraints.txt" | sha256sum | cut -c1-12)
venv=$cache/moto-$digest

if [[ ! -f $venv/.installed ]]; then
	printf '[storage-servers %s] installing moto into %s\n' "$(date +%H:%M:%S)" "$venv" >&2
	rm -rf "$venv"
	python3 -m venv "$venv"
	"$venv/bin/pip" install --quiet --disable-pip-version-check \
		--requirement "$pins/requirements.in" --constraint "$pins/constraints.txt"
	touch "$venv/.installed"
fi
echo "$venv/bin/moto_server"
