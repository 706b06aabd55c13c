#!/usr/bin/env bash
# Cluster DNS for the local cluster: CoreDNS, built from the wrapper module in hack/coredns/ (only
# the plugins its Corefile uses), run as a process on this host beside the control plane.
#
#   hack/coredns.sh build          build coredns (once)
#   hack/coredns.sh up [DIR]       write the Corefile, start CoreDNS on <node IP>:53; DIR is the
#                                  cluster's state directory (default .cluster/, as hack/cluster.sh)
#   hack/coredns.sh down [DIR]     stop it
#   hack/coredns.sh status [DIR]
#
# In a real cluster CoreDNS runs in pods behind the kube-dns Service; here it runs on the host, as
# the kubelet does, and listens on the node's address: the kubelet names that address as the
# nameserver in every pod's resolv.conf (clusterDNS, hack/real-node.sh), and pods reach it through
# their bridge's gateway as they reach the API server. It answers
# - <service>.<namespace>.svc.cluster.local with the ClusterIP, or for a headless Service with its
#   ready pods' IPs (how KubeRay's workers find their head: <cluster>-head-svc.<ns>.svc.cluster.local),
#   and reverse lookups of those addresses, from the API server (the admin kubeconfig);
# - every other name from the resolvers in the host's /etc/resolv.conf, as the host itself would.
# hack/real-node.sh starts it before the kubelet; hack/cluster.sh stops it with the node.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/real-node.sh
source "$root/hack/real-node.sh" # real_node_ip: the address the kubelet is given as clusterDNS
module=$root/hack/coredns
coredns_version=$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" { print $3; exit }' "$module/go.mod")
tools=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}
cache=$tools/coredns-$coredns_version
coredns=$cache/coredns

say() { printf '[coredns %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
component=coredns
# shellcheck source=lib/beside.sh
source "$root/hack/lib/beside.sh"

build() {
	[[ -x $coredns ]] && return
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9
	[[ -x $coredns ]] && return # built by another run while this one waited for the lock
	local started=$SECONDS status=0
	say "building coredns $coredns_version (from hack/coredns) ..."
	(exec 9>&-; while sleep 60; do say "  ... still building coredns ($(fmt_duration $((SECONDS - started))))"; done) &
	local ticker=$!
	(cd "$module" && go build -trimpath -ldflags "-s -w" -o "$coredns.partial" .) || status=$?
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	((status == 0)) || { rm -f "$coredns.partial"; say "FAILED to build coredns"; return "$status"; }
	mv "$coredns.partial" "$coredns"
	say "built coredns $coredns_version in $(fmt_duration $((SECONDS - started)))"
}

# What listens on port 53 of IP or of every address, over UDP or TCP (empty when it is free).
port_53_users() {
	local ip=$1
	{ ss -Hlunp; ss -Hltnp; } | awk -v ip="$ip" '{
		n = split($4, a, ":"); host = substr($4, 1, length($4) - length(a[n]) - 1)
	} a[n] == 53 && (host == ip || host == "0.0.0.0" || host == "*" || host == "[::]")'
}

corefile() {
	local ip=$1 health_port=$2 ready_port=$3
	cat <<EOF
# Written by hack/coredns.sh for the cluster in $state.
.:53 {
    bind $ip
    errors
    log
    health 127.0.0.1:$health_port
    ready 127.0.0.1:$ready_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $state/kubeconfig
        fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 30
}
EOF
}

up() {
	[[ -f $state/kubeconfig ]] || { say "no cluster in $state (hack/cluster.sh up starts one)"; return 1; }
	if running; then
		say "CoreDNS already runs for $state"
		return
	fi
	build
	local ip users health_port ready_port
	ip=$(real_node_ip)
	[[ -n $ip ]] || { say "FAILED: no IPv4 address on a default route to listen on"; return 1; }
	users=$(port_53_users "$ip")
	if [[ -n $users ]]; then
		say "FAILED: port 53 of $ip is taken:"
		sed 's/^/  /' <<<"$users" >&2
		return 1
	fi
	health_port=$(free_port)
	ready_port=$(free_port "$health_port")
	mkdir -p "$state/coredns"
	rm -f "$state/coredns/pids"
	corefile "$ip" "$health_port" "$ready_port" >"$state/coredns/Corefile"
	printf 'ip=%s\nhealth_port=%s\nready_port=%s\n' "$ip" "$health_port" "$ready_port" >"$state/coredns/ports"
	launch coredns "$state/coredns/coredns.log" "$coredns" -conf "$state/coredns/Corefile"
	# /ready answers 200 once the kubernetes plugin has listed the Services and EndpointSlices.
	wait_for "CoreDNS serving cluster.local on $ip:53 (ready, in sync with the API server)" 60 "$state/coredns/coredns.log" \
		curl -sf "http://127.0.0.1:$ready_port/ready" || { down; return 1; }
}

down() { stop_recorded; }

status() {
	if running; then
		# shellcheck source=/dev/null
		source "$state/coredns/ports"
		if curl -sf "http://127.0.0.1:$health_port/health" >/dev/null; then
			echo "CoreDNS $coredns_version serves $ip:53 for $state"
			return
		fi
		echo "CoreDNS runs for $state but its /health does not answer"
	else
		echo "CoreDNS is not running for $state"
	fi
	return 1
}

command=${1:-status}
state=$(state_dir "${2:-}")
case $command in
build) build ;;
up) up ;;
down) down ;;
status) status ;;
*)
	sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
