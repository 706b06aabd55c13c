#!/usr/bin/env bash
# For machines with Docker: the cluster tests against kind (real kubelets and
# containers) instead of the process-only control plane of hack/cluster.sh.
#
# One kind worker is dressed as a GPU node the way the NVIDIA GPU operator
# would leave it (labels, taint, nvidia.com/gpu in its capacity, patched into
# the node status as in the Kubernetes docs' "advertise extended resources");
# a second worker stays a plain CPU node. There are no GPUs: pods asking for
# nvidia.com/gpu are scheduled against the fake capacity and run as pause
# containers.
#
# Usage:
#   hack/kind.sh up              create the cluster (reused if it exists)
#   hack/kind.sh test [ARGS...]  up, then the cluster tests: pytest -m cluster ARGS
#   hack/kind.sh down            delete the cluster
# Environment: FORKLESS_KIND_NAME (forkless), FORKLESS_KIND_IMAGE (kind's default
# node image), FORKLESS_GPUS_PER_NODE (8). Needs kind, docker and kubectl on PATH.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=${FORKLESS_KIND_NAME:-forkless}
state=$root/.cluster-kind
kubeconfig=$state/kubeconfig
gpus=${FORKLESS_GPUS_PER_NODE:-8}

say() { printf '[kind] %s\n' "$*" >&2; }
kubectl() { command kubectl --kubeconfig "$kubeconfig" "$@"; }

up() {
	mkdir -p "$state"
	if kind get clusters 2>/dev/null | grep -qx "$name"; then
		say "reusing kind cluster $name"
		kind get kubeconfig --name "$name" >"$kubeconfig"
	else
		say "creating kind cluster $name (1 control plane, 2 workers)"
		kind create cluster --name "$name" --kubeconfig "$kubeconfig" --wait 120s \
			${FORKLESS_KIND_IMAGE:+--image "$FORKLESS_KIND_IMAGE"} --config - <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
- role: worker
EOF
	fi
	local gpu_node
	gpu_node=$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sort | head -n 1)
	say "dressing $gpu_node as a GPU node with $gpus fake nvidia.com/gpu"
	kubectl label --overwrite "$gpu_node" nvidia.com/gpu.present=true \
		nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 nvidia.com/gpu.memory=81559 \
		nvidia.com/gpu.count="$gpus" nvidia.com/gpu.family=hopper >/dev/null
	kubectl taint --overwrite "$gpu_node" nvidia.com/gpu=present:NoSchedule >/dev/null
	kubectl patch "$gpu_node" --subresource=status --type=json \
		-p "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$gpus\"}]" >/dev/null
	say "ready"
	echo "export FORKLESS_KUBECONFIG=$kubeconfig"
}

case ${1:-} in
up) up ;;
test)
	shift
	up >/dev/null
	FORKLESS_KUBECONFIG=$kubeconfig FORKLESS_KUBECTL=$(command -v kubectl) \
		exec "$root/.venv/bin/python" -m pytest -m cluster "$root/tests" "$@"
	;;
down)
	kind delete cluster --name "$name"
	rm -rf "$state"
	;;
*)
	sed -n '/^# Usage:/,/^# Environment:/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
	;;
esac
