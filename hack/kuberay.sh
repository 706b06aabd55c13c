#!/usr/bin/env bash
# KubeRay on the local cluster: its operator, built from the pinned Go module and run as a process
# beside the control plane, with its three CRDs (RayCluster, RayJob, RayService).
#
#   hack/kuberay.sh build          build kuberay-operator (once)
#   hack/kuberay.sh up [DIR]       CRDs, then the operator; DIR is the cluster's state directory
#                                  (default .cluster/, as hack/cluster.sh)
#   hack/kuberay.sh down [DIR]     stop the operator (the CRDs stay, like any CRD)
#   hack/kuberay.sh status [DIR]
#
# The module is github.com/ray-project/kuberay/ray-operator at $kuberay_version (facts and line
# references: docs/notes-kuberay-facts.md). It is built in a writable copy: the module cache is
# read-only, and `-mod=mod` may have to write go.sum.
# The operator runs on the host, which does not resolve cluster names (the real node's pods do, through
# hack/coredns.sh): it reaches a head's dashboard (:8265, the Serve REST API) and the Serve proxies'
# /-/healthz through the API server's services/proxy and pods/proxy (-use-kubernetes-proxy) instead of
# <cluster>-head-svc.<ns>.svc.cluster.local. The API server then dials the pod IP: the real node's pods
# answer, kwok's pods have no one behind theirs. Workers find their head by that name, as anywhere.
# The CRDs go in by server-side apply: each is over 256 KiB as JSON, more than the annotation that
# client-side apply would write may hold.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kuberay_version=v1.5.0
module=github.com/ray-project/kuberay/ray-operator
tools=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}
cache=$tools/kuberay-$kuberay_version
operator=$cache/kuberay-operator
crds=(rayclusters rayjobs rayservices)

say() { printf '[kuberay %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
component=kuberay
# shellcheck source=lib/beside.sh
source "$root/hack/lib/beside.sh"

module_dir() { go mod download -json "$module@$kuberay_version" | jq -r .Dir; }

build() {
	[[ -x $operator ]] && return
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9
	[[ -x $operator ]] && return # built by another run while this one waited for the lock
	local dir src started=$SECONDS status=0
	dir=$(module_dir)
	src=$(mktemp -d "$cache/src.XXXXXX")
	cp -r "$dir/." "$src"
	chmod -R u+w "$src"
	say "building kuberay-operator $kuberay_version (about two minutes on two cores) ..."
	(exec 9>&-; while sleep 60; do say "  ... still building kuberay-operator ($(fmt_duration $((SECONDS - started))))"; done) &
	local ticker=$!
	(cd "$src" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$operator.partial" .) || status=$?
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	rm -rf "$src"
	((status == 0)) || { rm -f "$operator.partial"; say "FAILED to build kuberay-operator"; return "$status"; }
	mv "$operator.partial" "$operator"
	say "built kuberay-operator in $(fmt_duration $((SECONDS - started)))"
}

kubectl() { "$root/.tools/bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }

up() {
	[[ -f $state/kubeconfig ]] || { say "no cluster in $state (hack/cluster.sh up starts one)"; return 1; }
	if running; then
		say "KubeRay already runs for $state"
		return
	fi
	build
	local dir crd port
	dir=$(module_dir)
	mkdir -p "$state/kuberay"
	rm -f "$state/kuberay/pids"
	for crd in "${crds[@]}"; do
		kubectl apply --server-side --force-conflicts --field-manager=forkless-kuberay \
			-f "$dir/config/crd/bases/ray.io_$crd.yaml" >/dev/null
	done
	for crd in "${crds[@]}"; do
		# `wait` fails at once while the new CRD has no status yet: retried until it has one.
		wait_for "CRD $crd.ray.io established" 60 "$state/kuberay/kuberay-operator.log" kubectl wait --for=condition=Established --timeout=2s "crd/$crd.ray.io"
	done
	port=$(free_port)
	echo "health_port=$port" >"$state/kuberay/ports"
	# No metrics server (-metrics-addr=0): nothing scrapes it here, and its default :8080 is taken.
	launch kuberay-operator "$state/kuberay/kuberay-operator.log" "$operator" -kubeconfig="$state/kubeconfig" \
		-use-kubernetes-proxy -enable-leader-election=false -metrics-addr=0 \
		-health-probe-bind-address="127.0.0.1:$port" -log-stdout-encoder=console
	wait_for "kuberay-operator ready" 120 "$state/kuberay/kuberay-operator.log" curl -sf "http://127.0.0.1:$port/readyz" || { down; return 1; }
	say "KubeRay $kuberay_version runs for $state (log in $state/kuberay/)"
}

down() { stop_recorded; }

command=${1:-status}
state=$(state_dir "${2:-}")
case $command in
build) build ;;
up) up ;;
down) down ;;
status) if running; then echo "KubeRay $kuberay_version runs for $state"; else echo "KubeRay is not running for $state"; exit 1; fi ;;
*)
	sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
