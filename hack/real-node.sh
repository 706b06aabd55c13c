# shellcheck shell=bash
# The real node of the local cluster, sourced by hack/cluster.sh (it uses its helpers: say,
# launch, wait_until, fail, kubectl, kubeconfig and the variables state, bin, root).
#
# One node that really runs containers, next to kwok's simulated ones: containerd 1.6 + runc
# (Debian), kubelet and kube-proxy v1.36.3 built from Go modules by hack/tools.sh, a CNI
# bridge, a pause image compiled from the kubernetes module's pause.c (hack/images.sh), and
# cluster DNS: CoreDNS on the node's address (hack/coredns.sh), the kubelet's clusterDNS.
# It is labelled and tainted forkless.dev/real-node=true, so that only pods that ask for it
# (a nodeSelector and a toleration: the demo, the real-pod tests, the chart's local values)
# land there, and GPU pods and the simulated-pod tests stay on kwok's nodes.
#
# The settings without which it fails, measured on this machine kind
# (../shared/notes/real-node.md): kubelet `failCgroupV1: false` (hybrid cgroup v1 host);
# containerd `restrict_oom_score_adj = true` (no CAP_SYS_RESOURCE: runc cannot set a negative
# oom_score_adj); runc, not crun; the apiserver's kubelet client certificate and
# `--kubelet-preferred-address-types=InternalIP,Hostname` (for logs and exec); `--node-ip`.
#
# Only one real node can run on a machine (kubelet and kube-proxy ports, the bridge, the
# kube-proxy nftables); `up` refuses a second one and says which cluster holds it.
#
# Outside its state directory the node touches /run/containerd, /run/netns, /var/lib/cni,
# /var/log/containers, the rncni0 bridge and veths, kubepods cgroups, nftables tables and
# net.ipv4.ip_forward; `down` records a baseline at `up` and restores it.

real_node_name=real-node-0
real_node_label=forkless.dev/real-node
real_node_cidr=10.244.0.0/24
real_node_bridge=rncni0
real_node_lock=/run/forkless-real-node.owner
# containerd's root (images, unpacked layers, metadata) outlives the cluster, like the binaries'
# cache: a new cluster finds the imported images there instead of importing 6 GB again. Only one
# real node runs at a time, so one store serves every cluster; `down` empties it of containers.
real_node_image_store=${FORKLESS_IMAGE_STORE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/containerd}

node_state() { echo "$state/node"; }

# The IPv4 address of the default-route interface: the kubelet serves there, the API server
# advertises it (so that pods reach the API server through the `kubernetes` Service), and the
# NodePorts listen there.
real_node_ip() {
	ip -4 -o route get 1.1.1.1 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }'
}

real_node_wanted() { [[ ${FORKLESS_REAL_NODES:-1} != 0 ]]; }

# ---------------------------------------------------------------- up

real_node_preflight() {
	"$root/hack/host-packages.sh" || fail kube-apiserver "the real node's packages are missing (see above)"
	if [[ -f $real_node_lock ]]; then
		local owner
		owner=$(cat "$real_node_lock")
		if [[ $owner != "$state" && -d $owner/node ]] && pgrep -f -- "--root-dir=$owner/node/kubelet" >/dev/null; then
			say "FAILED: a real node already runs on this machine, for the cluster in $owner"
			say "  stop it (FORKLESS_CLUSTER_DIR=$owner hack/cluster.sh down) or set FORKLESS_REAL_NODES=0"
			return 1
		fi
	fi
	if ss -Htln | awk '{ print $4 }' | grep -qE ':(10250|10248|10256|10249)$'; then
		say "FAILED: a kubelet or kube-proxy port (10248-10250, 10256) is taken on this machine"
		return 1
	fi
}

# What the node may change outside its state directory, recorded before it starts.
real_node_baseline() {
	local baseline=$(node_state)/baseline path
	{
		echo "ip_forward $(cat /proc/sys/net/ipv4/ip_forward)"
		for path in /run/containerd /run/netns /var/lib/cni /var/log/containers /etc/cni /var/lib/containers; do
			[[ -e $path ]] && echo "path $path"
		done
		nft list tables 2>/dev/null
	} >"$baseline"
}

real_node_containerd_config() {
	local dir=$(node_state)
	cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$real_node_image_store"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$dir/containerd/containerd.sock"
[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"
[debug]
  address = "$dir/containerd/debug.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$("$root/hack/images.sh" ref pause)"
  # runc cannot write a negative oom_score_adj without CAP_SYS_RESOURCE, which this host lacks.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
	mkdir -p "$dir/cni/net.d"
	cat >"$dir/cni/net.d/10-forkless.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "forkless",
  "plugins": [
    {"type": "bridge", "bridge": "$real_node_bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$real_node_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$dir/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

real_node_kubelet_config() {
	local dir=$(node_state) ip=$1
	cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host has hybrid cgroup v1; kubelet 1.36 refuses v1 unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $dir/pod-logs
resolvConf: /etc/resolv.conf
# CoreDNS (hack/coredns.sh) on this address: ClusterFirst pods get it as their nameserver, with
# <ns>.svc.cluster.local, svc.cluster.local and cluster.local searched first.
clusterDNS: [$ip]
clusterDomain: cluster.local
serializeImagePulls: false
# Images are built and imported here, never pulled: a collected image would not come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi"}
maxPods: 50
registerWithTaints:
- {key: $real_node_label, value: "true", effect: NoSchedule}
EOF
}

real_node_proxy_config() {
	local dir=$(node_state) ip=$1
	cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: $real_node_name
clusterCIDR: $real_node_cidr
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$ip/32"]
clientConnection: {kubeconfig: $dir/kube-proxy.kubeconfig}
# Leave the host's conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

ctr_node() { ctr --address "$(node_state)/containerd/containerd.sock" "$@"; }
containerd_ready() { ctr_node version; }
kubelet_healthy() { [[ $(curl -sf --max-time 2 http://127.0.0.1:10248/healthz) == ok ]]; }
proxy_healthy() { curl -sf --max-time 2 -o /dev/null http://127.0.0.1:10256/healthz; }
real_node_ready() {
	[[ $(kubectl get node "$real_node_name" \
		-o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

real_node_up() {
	local dir ip
	dir=$(node_state)
	real_node_preflight || fail kube-apiserver "the real node cannot start"
	ip=$(real_node_ip)
	[[ -n $ip ]] || fail kube-apiserver "no IPv4 address on a default route for the real node"
	mkdir -p "$dir/kubelet" "$dir/pod-logs"
	echo "$state" >"$real_node_lock"
	real_node_baseline
	real_node_containerd_config
	real_node_kubelet_config "$ip"
	real_node_proxy_config "$ip"
	kubeconfig "$dir/kubelet.kubeconfig" kubelet
	kubeconfig "$dir/kube-proxy.kubeconfig" kube-proxy

	local pids_file=$dir/pids
	launch containerd containerd --config "$dir/containerd.toml"
	wait_until containerd "containerd ready" containerd_ready
	FORKLESS_CLUSTER_DIR=$state "$root/hack/images.sh" all pause ||
		fail containerd "the pause image could not be built or imported"
	# Before the kubelet, so that no pod starts without the nameserver its resolv.conf names.
	"$root/hack/coredns.sh" up "$state" || fail coredns "CoreDNS did not start (its log is above)"

	launch kubelet "$bin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubelet.kubeconfig" \
		--root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" \
		--hostname-override="$real_node_name" --node-ip="$ip" \
		--node-labels="$real_node_label=true" --v=2
	wait_until kubelet "kubelet healthy" kubelet_healthy
	launch kube-proxy "$bin/kube-proxy" --config="$dir/kube-proxy.yaml"
	wait_until kube-proxy "kube-proxy healthy (nftables mode)" proxy_healthy
	wait_until kubelet "real node $real_node_name Ready ($ip; label and taint $real_node_label=true)" real_node_ready
}

# ---------------------------------------------------------------- down

# Pods first, while the kubelet and the API server still run: stopping a pod sandbox is what
# removes its network namespace and veth. Cordoned, so no controller puts a new one there.
real_node_evict() {
	real_node_ready || return 0
	say "cordoning $real_node_name and deleting its pods"
	kubectl cordon "$real_node_name" >/dev/null 2>&1 || true
	kubectl delete pods --all-namespaces --field-selector "spec.nodeName=$real_node_name" \
		--grace-period=1 --wait=false >/dev/null 2>&1 || true
	local deadline=$((SECONDS + 30))
	while ((SECONDS < deadline)); do
		[[ -z $(kubectl get pods --all-namespaces --field-selector "spec.nodeName=$real_node_name" -o name 2>/dev/null) ]] &&
			[[ -z $(ip netns list 2>/dev/null | grep '^cni-') ]] && return 0
		sleep 0.2
	done
	say "pods of $real_node_name still present after 30s; removing them by force"
}

# Containers left in containerd (any namespace): their tasks killed, then the containers removed, so
# that the image store the next cluster reuses holds images only.
real_node_remove_containers() {
	local namespace task container deadline
	ctr_node version >/dev/null 2>&1 || return 0
	for namespace in $(ctr_node namespaces ls -q 2>/dev/null); do
		for task in $(ctr_node -n "$namespace" tasks ls -q 2>/dev/null); do
			ctr_node -n "$namespace" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
		done
		for container in $(ctr_node -n "$namespace" containers ls -q 2>/dev/null); do
			deadline=$((SECONDS + 5))
			until ctr_node -n "$namespace" tasks delete "$container" >/dev/null 2>&1 ||
				! ctr_node -n "$namespace" tasks ls -q 2>/dev/null | grep -qx "$container" || ((SECONDS > deadline)); do
				sleep 0.1
			done
			ctr_node -n "$namespace" containers delete "$container" >/dev/null 2>&1 || true
		done
	done
}

real_node_stop() {
	local dir
	dir=$(node_state)
	[[ -f $dir/pids ]] || return 0
	real_node_evict
	stop_recorded "$dir/pids" kube-proxy kubelet
	real_node_remove_containers
	stop_recorded "$dir/pids"
	# A shim outlives containerd; it is ours when its command line names our socket.
	pkill -KILL -f -- "containerd-shim-runc-v2 .*-address $dir/containerd/containerd.sock" 2>/dev/null || true
	# The CRI plugin's per-pod files (hosts, resolv.conf) of the containers removed above.
	rm -rf "$real_node_image_store"/io.containerd.grpc.v1.cri/{sandboxes,containers}
}

# Everything the node left on the host, undone against the baseline recorded at `up`.
real_node_cleanup() {
	local dir baseline mount path table
	dir=$(node_state)
	baseline=$dir/baseline
	[[ -f $baseline ]] || return 0
	say "removing the real node's mounts, network namespaces, bridge, cgroups and nftables tables"
	"$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
	# Deepest first: the kubelet bind-mounts its own root; then volumes, shm, rootfs overlays.
	findmnt -rn -o TARGET | grep -F -- "$dir/" | sort -r | while read -r mount; do
		umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null || true
	done
	for path in $(ip netns list 2>/dev/null | awk '/^cni-/ { print $1 }'); do
		ip netns delete "$path" 2>/dev/null || true
	done
	ip link delete "$real_node_bridge" 2>/dev/null || true
	local hierarchy
	for hierarchy in /sys/fs/cgroup/*/; do
		[[ -d ${hierarchy}kubepods ]] || continue
		find "${hierarchy}kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	while read -r table; do
		# shellcheck disable=SC2086 # "table ip kube-proxy" -> nft delete table ip kube-proxy
		grep -qxF "$table" "$baseline" || nft delete $table 2>/dev/null || true
	done < <(nft list tables 2>/dev/null)
	sysctl -qw "net.ipv4.ip_forward=$(awk '$1 == "ip_forward" { print $2 }' "$baseline")" || true
	for path in /run/containerd /run/netns /var/lib/cni /var/log/containers /etc/cni /var/lib/containers; do
		grep -qxF "path $path" "$baseline" && continue
		[[ -e $path ]] || continue
		[[ $path == /run/netns ]] && { umount /run/netns 2>/dev/null || true; }
		rm -rf "$path"
	done
	[[ $(cat "$real_node_lock" 2>/dev/null) == "$state" ]] && rm -f "$real_node_lock"
	local left
	left=$(real_node_leftovers "$baseline")
	rm -f "$baseline"
	if [[ -n $left ]]; then
		say "FAILED to leave the host as it was; still here:"
		printf '  %s\n' "$left" >&2
		return 1
	fi
}

# What the node left behind on the host, one item per line (nothing when clean).
real_node_leftovers() {
	local baseline=$1 dir path table hierarchy
	dir=$(node_state)
	pgrep -af -- "$dir/" | sed 's/^/process /'
	pgrep -af -- "containerd-shim-runc-v2 .*-address $dir/" | sed 's/^/shim /'
	findmnt -rn -o TARGET | grep -F -- "$dir/" | sed 's/^/mount /'
	ip netns list 2>/dev/null | awk '/^cni-/ { print "network namespace " $1 }'
	ip link show "$real_node_bridge" >/dev/null 2>&1 && echo "bridge $real_node_bridge"
	for hierarchy in /sys/fs/cgroup/*/; do
		[[ -d ${hierarchy}kubepods ]] && echo "cgroup ${hierarchy}kubepods"
	done
	while read -r table; do
		grep -qxF "$table" "$baseline" || echo "nftables $table"
	done < <(nft list tables 2>/dev/null)
	[[ $(cat /proc/sys/net/ipv4/ip_forward) == "$(awk '$1 == "ip_forward" { print $2 }' "$baseline")" ]] ||
		echo "net.ipv4.ip_forward changed"
	for path in /run/containerd /run/netns /var/lib/cni /var/log/containers /etc/cni /var/lib/containers; do
		[[ -e $path ]] && ! grep -qxF "path $path" "$baseline" && echo "path $path"
	done
	return 0
}
