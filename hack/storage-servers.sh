#!/usr/bin/env bash
# Install, or reuse, the storage servers the tests download models from, and print the path of one:
#   moto      moto_server, an S3 API server (moto 5.2 in server mode, with IAM so a wrong key gets a
#             real 403), in a virtual environment of its own, cached outside the repository and keyed
#             by the hash of its pins: its botocore needs python-dateutil<3 and the project's
#             kubernetes client >=3, so the two cannot share .venv;
#   fake-gcs  fake-gcs-server, a GCS API server (Go, built from the module pinned in
#             hack/storage-servers/fake-gcs/go.mod into the tools cache).
#
# Usage: hack/storage-servers.sh [moto|fake-gcs]     prints the server's path on stdout (default moto)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pins=$root/hack/storage-servers
cache=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}

if [[ ${1:-moto} == fake-gcs ]]; then
	module=$pins/fake-gcs
	version=$(awk '$1 == "github.com/fsouza/fake-gcs-server" { print $2; exit }' <(sed 's/^require //' "$module/go.mod"))
	binary=$cache/fake-gcs-server-$version/fake-gcs-server
	if [[ ! -x $binary ]]; then
		printf '[storage-servers %s] building fake-gcs-server %s into %s\n' "$(date +%H:%M:%S)" "$version" "$binary" >&2
		(cd "$module" && go build -trimpath -o "$binary.tmp" github.com/fsouza/fake-gcs-server)
		mv "$binary.tmp" "$binary"
	fi
	echo "$binary"
	exit 0
fi
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
