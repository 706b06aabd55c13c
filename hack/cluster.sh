#!/usr/bin/env bash
# A real Kubernetes control plane on this machine, with simulated GPU nodes and one real
# node: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as local
# processes built by hack/tools.sh. kwok plays the kubelets of the GPU and CPU nodes: their
# pods become Running and Ready without a container, while the scheduler does real
# bin-packing of nvidia.com/gpu. The real node (hack/real-node.sh: containerd, runc, kubelet,
# kube-proxy, a CNI bridge) runs the pods that ask for it (label and taint
# forkless.dev/real-node=true) in real containers, from images built by hack/images.sh.
#
# Usage:
#   hack/cluster.sh up       start (or reuse a running) cluster; prints `export KUBECONFIG=...`
#   hack/cluster.sh down     stop every process `up` started and remove the state directory
#   hack/cluster.sh status   what runs, on which ports, and the nodes
#   hack/cluster.sh env      print the `export KUBECONFIG=...` line
# Progress goes to stderr and only the export line to stdout, so
# `eval "$(hack/cluster.sh up)"` works.
#
# Environment:
#   FORKLESS_CLUSTER_DIR     state directory (default .cluster/ in the repository): PKI,
#                            kubeconfigs, etcd data, logs/<process>.log, pids
#   FORKLESS_GPU_NODES       simulated 8-GPU nodes (default 2), tainted nvidia.com/gpu=present:NoSchedule
#   FORKLESS_GPUS_PER_NODE   nvidia.com/gpu per GPU node (default 8)
#   FORKLESS_CPU_NODES       untainted nodes without GPUs (default 1)
#   FORKLESS_REAL_NODES      1 (default): also start the real node (needs root and Debian
#                            packages that hack/host-packages.sh installs); 0: simulated only
#   FORKLESS_NODE_PODS       pod capacity of every node (default 1100, so 1000 pods fit on one)
#   FORKLESS_KUBE_API_QPS, FORKLESS_KUBE_API_BURST
#                            client rate limits of the controller-manager and scheduler (500, 1000);
#                            their defaults (20, 30) create only ~7 pods a second
#   FORKLESS_CONCURRENT_SYNCS
#                            Deployment and ReplicaSet workers of the controller-manager (20)
#   FORKLESS_START_TIMEOUT   seconds to wait for each component to become ready (60)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/real-node.sh
source "$root/hack/real-node.sh"
# shellcheck source=hack/lib/process.sh
source "$root/hack/lib/process.sh"
state=${FORKLESS_CLUSTER_DIR:-$root/.cluster}
[[ $state == /* ]] || state=$PWD/$state
bin=$root/.tools/bin
manifests=$root/hack/kwok

gpu_nodes=${FORKLESS_GPU_NODES:-2}
gpus_per_node=${FORKLESS_GPUS_PER_NODE:-8}
cpu_nodes=${FORKLESS_CPU_NODES:-1}
node_pods=${FORKLESS_NODE_PODS:-1100}
api_qps=${FORKLESS_KUBE_API_QPS:-500}
api_burst=${FORKLESS_KUBE_API_BURST:-1000}
concurrent_syncs=${FORKLESS_CONCURRENT_SYNCS:-20}
start_timeout=${FORKLESS_START_TIMEOUT:-60}

# Written into every state directory; `down` refuses to delete a directory
# without it, whatever FORKLESS_CLUSTER_DIR says.
marker=.forkless-cluster

started_at=$EPOCHREALTIME
say() { printf '[cluster +%5.1fs] %s\n' "$(elapsed)" "$*" >&2; }
elapsed() {
	local now=${EPOCHREALTIME/[.,]/} then=${started_at/[.,]/}
	printf '%d.%d' $(((now - then) / 1000000)) $(((now - then) % 1000000 / 100000))
}

# ---------------------------------------------------------------- processes

# Records are "name pid" lines in start order, in $pids_file: $state/pids for the control
# plane, $state/node/pids for the real node's processes.
pids_file=$state/pids
records() { [[ -f ${1:-$pids_file} ]] && cat "${1:-$pids_file}" || true; }

launch() {
	local name=$1
	shift
	# setsid: the cluster outlives the shell that ran `up` (and its Ctrl-C).
	setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
	echo "$name $!" >>"$pids_file"
	await_exec "$!"
}

pid_of() { records | awk -v n="$1" '$1 == n { print $2 }'; }

# stop_recorded FILE [NAME...]: stop the processes recorded in FILE (only NAMEs, if given) in
# reverse start order, each gone before the next is asked, and forget them.
stop_recorded() {
	local file=$1 name pid deadline
	shift
	[[ -f $file ]] || return 0
	while read -r name pid; do
		(($# == 0)) || [[ " $* " == *" $name "* ]] || continue
		if ours "$pid"; then
			say "stopping $name (pid $pid)"
			kill -TERM "$pid" 2>/dev/null || true
			deadline=$((SECONDS + 10))
			while ours "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
			if ours "$pid"; then
				say "$name ignored SIGTERM for 10s; sending SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
			fi
		fi
		sed -i "/^$name $pid\$/d" "$file"
	done < <(tac "$file")
	[[ -s $file ]] || rm -f "$file"
}

# The real node first (its pods need the API server to go), then its cluster DNS (hack/coredns.sh,
# which real_node_up starts; it watches the API server), then the control plane: kwok and the
# controllers before the apiserver, the apiserver before etcd.
stop_all() {
	real_node_stop
	"$root/hack/coredns.sh" down "$state" || host_dirty=1
	stop_recorded "$state/pids"
	real_node_cleanup || host_dirty=1
}
host_dirty=0

# Prints the log tail of a component, stops what was started and exits 1. The
# state directory stays, for the logs; the next `up` starts afresh.
fail() {
	local component=$1 message=$2
	say "FAILED: $message"
	if [[ -f $state/logs/$component.log ]]; then
		printf -- '---- last 40 lines of %s ----\n' "$state/logs/$component.log" >&2
		tail -n 40 "$state/logs/$component.log" >&2
		printf -- '----\n' >&2
	fi
	stop_all
	say "logs kept in $state/logs; \`hack/cluster.sh down\` removes them"
	exit 1
}

# wait_until COMPONENT WHAT COMMAND...: poll COMMAND until it succeeds; fail with
# COMPONENT's log when it exits or the deadline passes.
wait_until() {
	local component=$1 what=$2
	shift 2
	local pid deadline=$((SECONDS + start_timeout))
	pid=$(pid_of "$component")
	until "$@" >/dev/null 2>&1; do
		ours "$pid" || fail "$component" "$component exited while waiting for $what"
		((SECONDS < deadline)) || fail "$component" "no $what after ${start_timeout}s"
		sleep 0.1
	done
	say "$what"
}

# ---------------------------------------------------------------- set-up

free_ports() {
	local count=$1 port used
	used=" $(ss -Htan | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }') "
	while ((count > 0)); do
		# Below the kernel's ephemeral range, so outgoing connections do not take it.
		port=$((20000 + RANDOM % 12000))
		[[ $used == *" $port "* ]] && continue
		used+="$port "
		echo "$port"
		count=$((count - 1))
	done
}

make_pki() {
	local pki=$state/pki
	mkdir -p "$pki"
	(
		cd "$pki"
		key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null; }
		# issue NAME CA SUBJECT EXTENSIONS
		issue() {
			key "$1"
			openssl req -new -key "$1.key" -subj "$3" -out "$1.csr"
			openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -set_serial "0x$(openssl rand -hex 16)" \
				-days 365 -out "$1.crt" -extfile <(printf '%s\n' basicConstraints=critical,CA:FALSE \
					keyUsage=critical,digitalSignature,keyEncipherment "$4") 2>/dev/null
			rm "$1.csr"
		}
		ca() {
			key "$1"
			openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 -out "$1.crt" \
				-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
		}
		ca ca forkless-local-ca
		issue apiserver ca /CN=kube-apiserver "$(printf '%s\n' extendedKeyUsage=serverAuth \
			subjectAltName=IP:127.0.0.1,IP:10.96.0.1${node_ip:+,IP:$node_ip},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local)"
		issue admin ca /O=system:masters/CN=kubernetes-admin extendedKeyUsage=clientAuth
		issue scheduler ca /CN=system:kube-scheduler extendedKeyUsage=clientAuth
		issue kwok ca /O=system:masters/CN=kwok extendedKeyUsage=clientAuth
		# The real node: its kubelet (the Node authorizer knows it by this name), its
		# kube-proxy (bound to system:node-proxier by default), and the API server's own
		# identity towards kubelets (logs, exec).
		issue kubelet ca "/O=system:nodes/CN=system:node:$real_node_name" extendedKeyUsage=clientAuth
		issue kube-proxy ca /CN=system:kube-proxy extendedKeyUsage=clientAuth
		issue apiserver-kubelet-client ca /O=system:masters/CN=kube-apiserver-kubelet-client \
			extendedKeyUsage=clientAuth
		# The aggregation layer's own CA, so that the controllers find the
		# requestheader CA bundle they look for (and log about when missing).
		ca front-proxy-ca forkless-front-proxy-ca
		issue front-proxy-client front-proxy-ca /CN=front-proxy-client extendedKeyUsage=clientAuth
		# Service-account tokens are signed with this pair.
		openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
		openssl pkey -in sa.key -pubout -out sa.pub
	)
}

# kubeconfig FILE USER: a self-contained kubeconfig with the client cert USER.
kubeconfig() {
	local pki=$state/pki
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: forkless-local
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$pki/$2.crt")
    client-key-data: $(base64 -w0 "$pki/$2.key")
contexts:
- name: forkless-local
  context: {cluster: forkless-local, user: $2}
current-context: forkless-local
EOF
	chmod 600 "$1"
}

# GPU nodes first, then CPU nodes; each node gets its own InternalIP and pod
# CIDR, so pod IPs are unique across the cluster.
render_nodes() {
	local i n=0
	for ((i = 0; i < gpu_nodes; i++, n++)); do
		echo ---
		sed -e "s/@NAME@/gpu-node-$i/g" -e "s/@GPUS@/$gpus_per_node/g" -e "s/@PODS@/$node_pods/g" \
			-e "s|@IP@|172.18.0.$((2 + n))|g" -e "s|@POD_CIDR@|10.$((64 + n)).0.0/16|g" "$manifests/gpu-node.yaml"
	done
	for ((i = 0; i < cpu_nodes; i++, n++)); do
		echo ---
		sed -e "s/@NAME@/cpu-node-$i/g" -e "s/@PODS@/$node_pods/g" \
			-e "s|@IP@|172.18.0.$((2 + n))|g" -e "s|@POD_CIDR@|10.$((64 + n)).0.0/16|g" "$manifests/cpu-node.yaml"
	done
}

https_ok() { [[ $(curl -sf --max-time 2 "$@") == ok ]]; }
apiserver_ready() {
	https_ok --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" --key "$state/pki/admin.key" \
		"https://127.0.0.1:$apiserver_port/readyz"
}
# The controllers serve /healthz with a self-signed certificate of their own.
component_healthy() { https_ok -k "https://127.0.0.1:$1/healthz"; }

kubectl() { "$bin/kubectl" --kubeconfig "$state/kubeconfig" "$@"; }

nodes_ready() {
	local want=$((gpu_nodes + cpu_nodes)) ready
	ready=$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
		grep -c True) || return 1
	((ready == want))
}

# ---------------------------------------------------------------- commands

is_running() {
	[[ -f $state/ports ]] || return 1
	local name pid count=0
	while read -r name pid; do
		ours "$pid" || return 1
		count=$((count + 1))
	done < <(records)
	((count == 5)) || return 1 # an `up` that was interrupted half-way
	if real_node_wanted; then
		count=0
		while read -r name pid; do
			ours "$pid" || return 1
			count=$((count + 1))
		done < <(records "$(node_state)/pids")
		((count == 3)) || return 1
		"$root/hack/coredns.sh" status "$state" >/dev/null || return 1
	fi
	# shellcheck source=/dev/null
	source "$state/ports"
	apiserver_ready
}

print_env() { echo "export KUBECONFIG=$state/kubeconfig"; }

up() {
	if is_running; then
		say "reusing the cluster running in $state (API https://127.0.0.1:$apiserver_port)"
		print_env
		return
	fi
	if [[ -e $state ]]; then
		say "$state holds a cluster that is not (fully) running; starting afresh"
		down_quietly
	fi

	"$root/hack/tools.sh"
	if real_node_wanted; then
		"$root/hack/coredns.sh" build
	fi
	started_at=$EPOCHREALTIME

	mkdir -p "$state/logs"
	touch "$state/$marker"
	local -a ports
	mapfile -t ports < <(free_ports 5)
	etcd_port=${ports[0]} etcd_peer_port=${ports[1]} apiserver_port=${ports[2]}
	controller_manager_port=${ports[3]} scheduler_port=${ports[4]}
	declare -p etcd_port etcd_peer_port apiserver_port controller_manager_port scheduler_port |
		sed 's/^declare -- //' >"$state/ports"

	# With the real node, the API server listens on every address and advertises the node's
	# address: pods reach it through the `kubernetes` Service (kube-proxy), as in a cluster.
	node_ip=
	local bind_address=127.0.0.1 advertise_address=127.0.0.1 endpoint_reconciler=none
	if real_node_wanted; then
		node_ip=$(real_node_ip)
		[[ -n $node_ip ]] || fail kube-apiserver "no IPv4 address on a default route for the real node"
		bind_address=0.0.0.0 advertise_address=$node_ip endpoint_reconciler=lease
	fi
	make_pki
	local pki=$state/pki
	kubeconfig "$state/kubeconfig" admin
	kubeconfig "$state/scheduler.kubeconfig" scheduler
	kubeconfig "$state/kwok.kubeconfig" kwok
	say "certificates and kubeconfigs written to $state"

	launch etcd "$bin/etcd" \
		--name=node0 --data-dir="$state/etcd" \
		--listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
		--listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
		--initial-cluster="node0=http://127.0.0.1:$etcd_peer_port" \
		--auto-compaction-retention=1 --quota-backend-bytes=8589934592 \
		--unsafe-no-fsync # a throw-away cluster: durability is not worth the fsync latency
	say "started etcd on 127.0.0.1:$etcd_port"

	# The apiserver retries etcd on its own; starting both at once saves time.
	launch kube-apiserver "$bin/kube-apiserver" \
		--etcd-servers="http://127.0.0.1:$etcd_port" \
		--bind-address="$bind_address" --advertise-address="$advertise_address" --secure-port="$apiserver_port" \
		--tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
		--client-ca-file="$pki/ca.crt" \
		--authorization-mode=Node,RBAC \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
		--service-cluster-ip-range=10.96.0.0/16 \
		--endpoint-reconciler-type="$endpoint_reconciler" \
		--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
		--kubelet-client-key="$pki/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types=InternalIP,Hostname \
		--requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
		--requestheader-allowed-names=front-proxy-client \
		--requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
		--requestheader-extra-headers-prefix=X-Remote-Extra- \
		--proxy-client-cert-file="$pki/front-proxy-client.crt" --proxy-client-key-file="$pki/front-proxy-client.key"
	say "started kube-apiserver on https://127.0.0.1:$apiserver_port"
	wait_until etcd "etcd healthy" curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"
	wait_until kube-apiserver "kube-apiserver ready (/readyz ok)" apiserver_ready

	# Only now: the controller-manager exits when the RBAC bootstrap roles do
	# not exist yet. It runs as system:masters without per-controller service
	# account credentials, as kwokctl does: the default ServiceAccount exists
	# ~5 s sooner. The scheduler keeps its own identity.
	launch kube-controller-manager "$bin/kube-controller-manager" \
		--kubeconfig="$state/kubeconfig" \
		--authentication-kubeconfig="$state/kubeconfig" --authorization-kubeconfig="$state/kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$controller_manager_port" --leader-elect=false \
		--use-service-account-credentials=false \
		--root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
		--cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
		--kube-api-qps="$api_qps" --kube-api-burst="$api_burst" \
		--concurrent-deployment-syncs="$concurrent_syncs" --concurrent-replicaset-syncs="$concurrent_syncs"
	launch kube-scheduler "$bin/kube-scheduler" \
		--kubeconfig="$state/scheduler.kubeconfig" \
		--authentication-kubeconfig="$state/scheduler.kubeconfig" \
		--authorization-kubeconfig="$state/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --secure-port="$scheduler_port" --leader-elect=false \
		--kube-api-qps="$api_qps" --kube-api-burst="$api_burst"
	# KWOK_WORKDIR keeps a personal ~/.kwok/kwok.yaml out of the cluster.
	launch kwok env KWOK_WORKDIR="$state/kwok" "$bin/kwok" \
		--kubeconfig="$state/kwok.kubeconfig" --config="$manifests/stages.yaml" \
		--manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
		--node-ip=10.0.0.1 --cidr=10.0.0.1/16 --node-lease-duration-seconds=40
	say "started kube-controller-manager, kube-scheduler and kwok"

	render_nodes | kubectl apply -f - >/dev/null ||
		fail kube-apiserver "the simulated nodes were not accepted"
	wait_until kwok "$gpu_nodes GPU node(s) with $gpus_per_node nvidia.com/gpu each and $cpu_nodes CPU node(s) Ready" \
		nodes_ready
	wait_until kube-controller-manager "kube-controller-manager healthy" component_healthy "$controller_manager_port"
	wait_until kube-scheduler "kube-scheduler healthy" component_healthy "$scheduler_port"
	# Pods cannot be created in a namespace before its default ServiceAccount exists.
	wait_until kube-controller-manager "ServiceAccount default/default created" \
		kubectl get serviceaccount default --namespace default
	if real_node_wanted; then
		real_node_up
	fi

	say "cluster ready; logs in $state/logs"
	print_env
}

down_quietly() {
	# KEDA (hack/keda.sh) and KubeRay (hack/kuberay.sh), when they run beside this cluster, go
	# first: they talk to the API server.
	[[ -f $state/keda/pids ]] && "$root/hack/keda.sh" down "$state" || true
	[[ -f $state/kuberay/pids ]] && "$root/hack/kuberay.sh" down "$state" || true
	stop_all
	if [[ -d $state ]]; then
		[[ -f $state/$marker ]] || {
			say "refusing to delete $state: it has no $marker file, so hack/cluster.sh did not create it"
			exit 1
		}
		# A bind mount left inside (a pod's hostPath or local volume) would let rm reach the
		# host's files through it.
		if findmnt -rn -o TARGET | grep -qF -- "$state/"; then
			say "refusing to delete $state: these are still mounted inside it:"
			findmnt -rn -o TARGET | grep -F -- "$state/" >&2
			exit 1
		fi
		rm -rf "$state"
	fi
}

down() {
	if [[ ! -e $state ]]; then
		say "nothing to stop: $state does not exist"
		return
	fi
	down_quietly
	say "stopped; removed $state"
	((host_dirty == 0)) || exit 1
}

status() {
	if [[ ! -f $state/pids ]]; then
		if [[ -d $state/logs ]]; then
			say "nothing runs in $state; logs of the last attempt are in $state/logs"
		else
			say "no cluster in $state"
		fi
		return 1
	fi
	# shellcheck source=/dev/null
	[[ -f $state/ports ]] && source "$state/ports"
	local name pid
	while read -r name pid; do
		local port=
		case $name in
		etcd) port=http://127.0.0.1:${etcd_port:-?} ;;
		kube-apiserver) port=https://127.0.0.1:${apiserver_port:-?} ;;
		kube-controller-manager) port=https://127.0.0.1:${controller_manager_port:-?}/healthz ;;
		kube-scheduler) port=https://127.0.0.1:${scheduler_port:-?}/healthz ;;
		kubelet) port="node $real_node_name, healthz http://127.0.0.1:10248" ;;
		kube-proxy) port="nftables, healthz http://127.0.0.1:10256" ;;
		esac
		if ours "$pid"; then
			printf '  %-24s pid %-8s running  %s\n' "$name" "$pid" "$port" >&2
		else
			printf '  %-24s pid %-8s EXITED   (see %s)\n' "$name" "$pid" "$state/logs/$name.log" >&2
		fi
	done < <(records; records "$(node_state)/pids")
	[[ -f $state/coredns/pids ]] && printf '  %s\n' "$("$root/hack/coredns.sh" status "$state")" >&2
	if is_running; then
		say "running in $state"
		kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count -L "$real_node_label" >&2
		print_env
	else
		say "not (fully) running in $state; \`hack/cluster.sh up\` restarts it"
		return 1
	fi
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
env) print_env ;;
*)
	sed -n '/^# Usage:/,/^# Environment:/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
	;;
esac
