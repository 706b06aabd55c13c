#!/usr/bin/env bash
# Build, or reuse, the pinned binaries of the local control plane and link them
# into .tools/bin/.
#
# Every version comes from a wrapper module under hack/k8s/ whose go.mod and
# go.sum are committed, so a build is reproducible:
#   hack/k8s/kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#                        and the real node's kubelet and kube-proxy
#   hack/k8s/etcd        etcd
#   hack/k8s/kwok        kwok
#   hack/k8s/helm        helm
# Binaries are cached outside the repository, one directory per component and
# version ($FORKLESS_TOOLS_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools/
# <component>-<version>/), so checkouts and worktrees share them and a second run
# builds nothing. Builds run one at a time: the machine this was written for has
# two cores, and linking kube-apiserver alone peaks near 2 GiB.
#
# Usage: hack/tools.sh             build what is missing, link everything
#        hack/tools.sh --list      print component, version and cache state
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
modules=$root/hack/k8s
cache=${FORKLESS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forkless/tools}
bin=$root/.tools/bin

say() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The version of $2 that the wrapper module in hack/k8s/$1 requires, read from
# go.mod directly so that a cached start does not need the go command at all.
required_version() {
	awk -v mod="$2" '
		$1 == "require" && $2 == mod { print $3; exit }
		$1 == mod && $2 ~ /^v/ { print $2; exit }
	' "$modules/$1/go.mod"
}

k8s_version=$(required_version kubernetes k8s.io/kubernetes)
etcd_version=$(required_version etcd go.etcd.io/etcd/server/v3)
kwok_version=$(required_version kwok sigs.k8s.io/kwok)
helm_version=$(required_version helm helm.sh/helm/v4)

# component  version  wrapper-module  package
components=(
	"kube-apiserver          $k8s_version  kubernetes k8s.io/kubernetes/cmd/kube-apiserver"
	"kube-controller-manager $k8s_version  kubernetes k8s.io/kubernetes/cmd/kube-controller-manager"
	"kube-scheduler          $k8s_version  kubernetes k8s.io/kubernetes/cmd/kube-scheduler"
	"kubectl                 $k8s_version  kubernetes k8s.io/kubernetes/cmd/kubectl"
	"kubelet                 $k8s_version  kubernetes k8s.io/kubernetes/cmd/kubelet"
	"kube-proxy              $k8s_version  kubernetes k8s.io/kubernetes/cmd/kube-proxy"
	"etcd                    $etcd_version etcd       go.etcd.io/etcd/server/v3"
	"kwok                    $kwok_version kwok       sigs.k8s.io/kwok/cmd/kwok"
	"helm                    $helm_version helm       helm.sh/helm/v4/cmd/helm"
)

# Version stamps. Without them the k8s binaries report
# v0.0.0-master+$Format:%H$, which breaks `kubectl version` and Helm's
# kubeVersion checks; helm would call itself "v4.3". The build date is the
# release's own timestamp, so rebuilding gives the same bytes.
version_ldflags() {
	local component=$1 version=$2 module=$3
	case $module in
	kubernetes)
		local date minor=${version#v*.} major=${version#v}
		major=${major%%.*} minor=${minor%%.*}
		date=$(cd "$modules/kubernetes" &&
			go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
		local pkg
		for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			printf ' -X %s.%s' \
				"$pkg" "gitVersion=$version" "$pkg" "gitMajor=$major" \
				"$pkg" "gitMinor=$minor" "$pkg" "gitTreeState=clean" \
				"$pkg" "buildDate=$date"
		done
		;;
	etcd) printf ' -X go.etcd.io/etcd/api/v3/version.GitSHA=%s' "$version" ;;
	helm) printf ' -X helm.sh/helm/v4/internal/version.version=%s' "$version" ;;
	esac
}

fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

build() {
	local component=$1 version=$2 module=$3 package=$4
	local dir=$cache/$component-$version
	local ldflags started ticker status=0
	mkdir -p "$dir"
	ldflags="-s -w$(version_ldflags "$component" "$version" "$module")"
	say "building $component $version (from hack/k8s/$module) ..."
	started=$SECONDS
	# A heartbeat, so a 5-minute link does not look like a hang.
	# Without the lock's descriptor: a `sleep` outliving the kill must not hold the lock.
	(exec 9>&-; while sleep 30; do say "  ... still building $component ($(fmt_duration $((SECONDS - started))))"; done) &
	ticker=$!
	(cd "$modules/$module" && go build -ldflags "$ldflags" -o "$dir/$component.partial" "$package") || status=$?
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	if ((status != 0)); then
		rm -f "$dir/$component.partial"
		say "FAILED to build $component $version (exit $status)"
		return "$status"
	fi
	# Renamed only when complete: an interrupted build never looks cached.
	mv "$dir/$component.partial" "$dir/$component"
	say "built $component $version in $(fmt_duration $((SECONDS - started)))"
}

if [[ ${1:-} == --list ]]; then
	for entry in "${components[@]}"; do
		read -r component version _ <<<"$entry"
		state=missing
		[[ -x $cache/$component-$version/$component ]] && state=cached
		printf '%-24s %-9s %s\n' "$component" "$version" "$state"
	done
	exit 0
fi

mkdir -p "$cache" "$bin"
# One build at a time, also across checkouts and test sessions sharing the cache.
exec 9>"$cache/.lock"
if ! flock -n 9; then
	say "another hack/tools.sh holds $cache/.lock; waiting for it"
	flock 9
fi

total_started=$SECONDS
built=0
for entry in "${components[@]}"; do
	read -r component version module package <<<"$entry"
	target=$cache/$component-$version/$component
	if [[ ! -x $target ]]; then
		build "$component" "$version" "$module" "$package"
		built=$((built + 1))
	fi
	ln -sfn "$target" "$bin/$component"
done

if ((built > 0)); then
	say "built $built binaries in $(fmt_duration $((SECONDS - total_started))); linked into ${bin#"$root"/}"
else
	say "all ${#components[@]} binaries cached in $cache; linked into ${bin#"$root"/}"
fi
