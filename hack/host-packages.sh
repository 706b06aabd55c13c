#!/usr/bin/env bash
# Install, when missing, the Debian packages the real node and the image builds need:
# containerd and runc (the container runtime; crun does not work on this kernel's hybrid
# cgroups), the CNI plugins, buildah and mmdebstrap (images without Docker), iptables,
# nftables and conntrack (kube-proxy), gcc + libc6-dev (the static pause binary), and openssl
# and curl (hack/keda.sh: KEDA's certificates and its health checks).
# Versions are Debian bookworm's (containerd 1.6, runc 1.1), which kubelet 1.36 supports.
#
# Usage: hack/host-packages.sh [--check]   (--check: list what is missing, install nothing)
set -euo pipefail

packages=(containerd runc buildah mmdebstrap containernetworking-plugins iptables nftables conntrack
	jq gcc libc6-dev openssl curl)

say() { printf '[packages %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing=()
for package in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
	exit 0
fi
if [[ ${1:-} == --check ]]; then
	printf '%s\n' "${missing[@]}"
	exit 1
fi
if ((EUID != 0)); then
	say "missing Debian packages: ${missing[*]}; the real node needs root to install and run them"
	say "(run as root, or set FORKLESS_REAL_NODES=0 for a cluster of simulated nodes only)"
	exit 1
fi
command -v apt-get >/dev/null || {
	say "missing packages ${missing[*]}, and no apt-get: install them with your package manager"
	exit 1
}
say "installing ${missing[*]} (apt-get, --no-install-recommends) ..."
# No package may start a daemon at install: the node starts containerd itself, with its own config.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod +x "$policy"
	added_policy=1
fi
trap '((added_policy)) && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The package lists of a fresh machine may be missing or stale.
apt-get update -qq >&2
apt-get install --yes --quiet --no-install-recommends "${missing[@]}" >&2
say "installed ${missing[*]}"
