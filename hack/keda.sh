#!/usr/bin/env bash
# KEDA on the local cluster: its operator and its metrics API server (the adapter), built from
# the pinned Go module and run as processes beside the control plane, with its CRDs; and
# metrics-server (resource metrics, what a CPU HPA reads), so that both kinds of autoscaler work.
#
#   hack/keda.sh build          build keda-operator, keda-adapter and metrics-server (once)
#   hack/keda.sh up [DIR]       CRDs, certificates, both processes, the APIService; DIR is the
#                               cluster's state directory (default .cluster/, as hack/cluster.sh)
#   hack/keda.sh down [DIR]     stop both, remove the APIService (the CRDs stay, like any CRD)
#   hack/keda.sh status [DIR]
#
# The module is github.com/kedacore/keda/v2 at $keda_version; it is built inside its own module
# directory (its go.mod has a replace directive that a wrapper module would drop), one binary at a
# time. KEDA runs as it does in its pods, with what its pods get from Kubernetes made by hand: a CA
# and one certificate for the operator's metrics gRPC service and the adapter (KEDA's cert
# rotation needs the kubelet to mount its Secret), the namespace variables, and a Service without
# selector whose Endpoints point at this host, so that the API server's aggregator reaches the
# adapter for external.metrics.k8s.io. The HPA that KEDA creates then reads its metrics there.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keda_version=v2.21.0
module=github.com/kedacore/keda/v2
tools=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}
cache=$tools/keda-$keda_version
metrics_server_version=v0.8.0
metrics_server=$tools/metrics-server-$metrics_server_version/metrics-server
metrics_server_port=6444
namespace=keda
adapter_port=6443
operator_grpc_port=9666

say() { printf '[keda %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
component=keda
# shellcheck source=lib/beside.sh
source "$root/hack/lib/beside.sh"

module_dir() { go mod download -json "$module@$keda_version" | jq -r .Dir; }

build() {
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9
	local dir component started
	for component in operator adapter; do
		[[ -x $cache/keda-$component ]] && continue
		dir=$(module_dir)
		started=$SECONDS
		say "building keda-$component $keda_version (a large build: several minutes on two cores) ..."
		(exec 9>&-; while sleep 60; do say "  ... still building keda-$component ($(fmt_duration $((SECONDS - started))))"; done) &
		local ticker=$! status=0
		(cd "$dir" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X github.com/kedacore/keda/v2/version.Version=$keda_version" \
			-o "$cache/keda-$component.partial" "./cmd/$component") || status=$?
		kill "$ticker" 2>/dev/null || true
		wait "$ticker" 2>/dev/null || true
		((status == 0)) || { rm -f "$cache/keda-$component.partial"; say "FAILED to build keda-$component"; return "$status"; }
		mv "$cache/keda-$component.partial" "$cache/keda-$component"
		say "built keda-$component in $(fmt_duration $((SECONDS - started)))"
	done
	if [[ ! -x $metrics_server ]]; then
		started=$SECONDS
		say "building metrics-server $metrics_server_version ..."
		mkdir -p "$(dirname "$metrics_server")"
		dir=$(go mod download -json "sigs.k8s.io/metrics-server@$metrics_server_version" | jq -r .Dir)
		(cd "$dir" && GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$metrics_server.partial" ./cmd/metrics-server)
		mv "$metrics_server.partial" "$metrics_server"
		say "built metrics-server in $(fmt_duration $((SECONDS - started)))"
	fi
}

kubectl() { "$root/.tools/bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }

host_ip() { ip -4 -o route get 1.1.1.1 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }'; }

certificates() {
	local dir=$state/keda/certs ip=$1
	[[ -f $dir/tls.crt ]] && return
	mkdir -p "$dir"
	openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/O=KEDAORG/CN=KEDA" \
		-keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
	openssl req -newkey rsa:2048 -nodes -subj "/O=KEDAORG/CN=keda-operator" \
		-keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
	printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:keda-operator.%s.svc,DNS:keda-operator.%s.svc.cluster.local,DNS:keda-metrics-apiserver.%s.svc\nextendedKeyUsage=serverAuth,clientAuth\n' \
		"$ip" "$namespace" "$namespace" "$namespace" >"$dir/ext.cnf"
	openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 3650 \
		-extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
}

# aggregate NAME NAMESPACE PORT GROUP IP: serve GROUP/v1beta1 from a process on this host (IP:PORT)
# through the API server's aggregator: a Service without selector, its Endpoints, the APIService.
aggregate() {
	local name=$1 ns=$2 port=$3 group=$4 ip=$5
	kubectl apply -f - >/dev/null 2>&1 <<-EOF
		apiVersion: v1
		kind: Service
		metadata: {name: $name, namespace: $ns}
		spec:
		  ports: [{name: https, port: 443, targetPort: $port, protocol: TCP}]
		---
		apiVersion: v1
		kind: Endpoints
		metadata: {name: $name, namespace: $ns}
		subsets:
		  - addresses: [{ip: $ip}]
		    ports: [{name: https, port: $port, protocol: TCP}]
		---
		apiVersion: apiregistration.k8s.io/v1
		kind: APIService
		metadata: {name: v1beta1.$group}
		spec:
		  service: {name: $name, namespace: $ns, port: 443}
		  group: $group
		  version: v1beta1
		  insecureSkipTLSVerify: true
		  groupPriorityMinimum: 100
		  versionPriority: 100
	EOF
}

up() {
	[[ -f $state/kubeconfig ]] || { say "no cluster in $state (hack/cluster.sh up starts one)"; return 1; }
	if running; then
		say "KEDA already runs for $state"
		return
	fi
	build
	local dir ip
	dir=$(module_dir)
	ip=$(host_ip)
	mkdir -p "$state/keda"
	rm -f "$state/keda/pids"
	kubectl apply --server-side --force-conflicts --field-manager=forkless-keda -f "$dir/config/crd/bases" >/dev/null
	# `wait` fails at once while the new CRD has no status yet: retried until it has one.
	wait_for "KEDA's CRDs established" 60 "$state/keda/keda-operator.log" kubectl wait --for=condition=Established --timeout=2s crd/scaledobjects.keda.sh
	kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
	certificates "$ip"
	local env=(env KUBECONFIG="$state/kubeconfig" WATCH_NAMESPACE="" POD_NAMESPACE="$namespace"
		KEDA_CLUSTER_OBJECT_NAMESPACE="$namespace" OPERATOR_NAME=keda-operator KEDA_HTTP_DEFAULT_TIMEOUT=3000)
	launch keda-operator "$state/keda/keda-operator.log" "${env[@]}" "$cache/keda-operator" --leader-elect=false --enable-cert-rotation=false \
		--cert-dir="$state/keda/certs" --metrics-bind-address=127.0.0.1:18080 --health-probe-bind-address=127.0.0.1:18081 \
		--metrics-service-bind-address=127.0.0.1:$operator_grpc_port --zap-log-level=info
	wait_for "keda-operator healthy" 120 "$state/keda/keda-operator.log" curl -sf http://127.0.0.1:18081/healthz || { down; return 1; }
	launch keda-adapter "$state/keda/keda-adapter.log" "${env[@]}" "$cache/keda-adapter" --secure-port=$adapter_port \
		--tls-cert-file="$state/keda/certs/tls.crt" --tls-private-key-file="$state/keda/certs/tls.key" \
		--cert-dir="$state/keda/certs" --lister-kubeconfig="$state/kubeconfig" \
		--authentication-kubeconfig="$state/kubeconfig" --authorization-kubeconfig="$state/kubeconfig" \
		--metrics-service-address=127.0.0.1:$operator_grpc_port --metrics-service-grpc-authority=localhost \
		--port=18082 --zap-log-level=info
	wait_for "keda-adapter serving" 120 "$state/keda/keda-adapter.log" curl -skf "https://127.0.0.1:$adapter_port/readyz" || { down; return 1; }
	aggregate keda-metrics-apiserver "$namespace" $adapter_port external.metrics.k8s.io "$ip"
	wait_for "external.metrics.k8s.io available" 120 "$state/keda/keda-adapter.log" \
		kubectl wait --for=condition=Available --timeout=2s apiservice/v1beta1.external.metrics.k8s.io || { down; return 1; }
	# metrics-server: the kubelet's resource metrics for CPU HPAs (TLS to the kubelet unchecked: its
	# serving certificate is self-signed on the local cluster).
	launch metrics-server "$state/keda/metrics-server.log" "$metrics_server" --secure-port=$metrics_server_port --cert-dir="$state/keda/metrics-server" \
		--kubeconfig="$state/kubeconfig" --authentication-kubeconfig="$state/kubeconfig" \
		--authorization-kubeconfig="$state/kubeconfig" --kubelet-insecure-tls \
		--kubelet-preferred-address-types=InternalIP --metric-resolution=15s
	wait_for "metrics-server serving" 120 "$state/keda/metrics-server.log" curl -skf "https://127.0.0.1:$metrics_server_port/livez" || { down; return 1; }
	aggregate metrics-server kube-system $metrics_server_port metrics.k8s.io "$ip"
	wait_for "metrics.k8s.io available" 120 "$state/keda/metrics-server.log" \
		kubectl wait --for=condition=Available --timeout=2s apiservice/v1beta1.metrics.k8s.io || { down; return 1; }
	say "KEDA $keda_version and metrics-server $metrics_server_version run for $state (logs in $state/keda/)"
}

down() {
	if [[ -f $state/kubeconfig ]] && [[ -x $root/.tools/bin/kubectl ]]; then
		kubectl delete apiservice v1beta1.external.metrics.k8s.io v1beta1.metrics.k8s.io --ignore-not-found \
			--wait=false >/dev/null 2>&1 || true
	fi
	stop_recorded
}

command=${1:-status}
state=$(state_dir "${2:-}")
case $command in
build) build ;;
up) up ;;
down) down ;;
status) if running; then echo "KEDA $keda_version runs for $state"; else echo "KEDA is not running for $state"; exit 1; fi ;;
*)
	sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
