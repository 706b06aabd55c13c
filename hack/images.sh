#!/usr/bin/env bash
# Build the forkless images without Docker, and import them into the local real node.
#
#   runtime   runtime/Dockerfile   -> localhost/forkless-runtime:<version>
#   operator  operator/Dockerfile  -> localhost/forkless-operator:<version>
#   ray       runtime/Dockerfile.ray -> localhost/forkless-ray:<version> (the runtime image plus
#             ray[serve], for InferenceServices with engine: ray; built on the runtime image)
#   pause     the Kubernetes pause binary, compiled from the pinned kubernetes module's
#             build/pause/linux/pause.c -> localhost/forkless-pause:<kubernetes version>
#
# The Dockerfiles are the ones Docker/BuildKit users build; here buildah builds them
# (--isolation chroot: crun fails on this kernel's hybrid cgroups; --network host: buildah's
# own bridge would leave CNI state on the host) with --build-arg BASE_IMAGE set to a Debian
# bookworm root filesystem made by mmdebstrap (python3 and its venv module included), and
# with the wheels of the pinned constraints downloaded once into a directory that is mounted
# into the build (pip installs from it with no index). Nothing is pulled from a registry.
#
# An image is rebuilt only when its inputs change: the hash of its Dockerfile, the files it
# copies and its base is kept next to its OCI archive. Layers are cached (--layers), so a
# change to forkless's own code rebuilds only the last layers, not the torch layer.
#
# Usage:
#   hack/images.sh [build|import|all] [runtime|operator|ray|pause ...]
#       build   build what changed, export OCI archives into the cache
#       import  import the archives into the real node's containerd (k8s.io namespace), when
#               the node of $FORKLESS_CLUSTER_DIR (default .cluster/) runs and lacks them
#       all     both (the default); with no image named: runtime and operator
#   hack/images.sh list     images, sizes and cache state
#   hack/images.sh ref IMAGE   print the image reference (e.g. localhost/forkless-runtime:0.1.0)
#
# Environment:
#   FORKLESS_IMAGES_CACHE  buildah store, archives and the base (default ~/.cache/forkless/images)
#   FORKLESS_WHEELS_DIR    wheels of the pinned constraints (default ~/.cache/forkless/wheels)
#   FORKLESS_CLUSTER_DIR   the cluster whose real node imports the images (default .cluster/)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_home=${XDG_CACHE_HOME:-$HOME/.cache}/forkless
cache=${FORKLESS_IMAGES_CACHE:-$cache_home/images}
wheels=${FORKLESS_WHEELS_DIR:-$cache_home/wheels}
cluster=${FORKLESS_CLUSTER_DIR:-$root/.cluster}
[[ $cluster == /* ]] || cluster=$PWD/$cluster

suite=bookworm
debian_mirror=http://deb.debian.org/debian
base_packages=python3,python3-venv,ca-certificates
base_ref=localhost/forkless-base:$suite
# The base's python: the wheels are downloaded for it, whatever python runs this script.
base_python=3.11

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")
k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' \
	"$root/hack/k8s/kubernetes/go.mod")

say() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fmt_duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# heartbeat WHAT COMMAND...: run COMMAND, saying every 30 s that it still runs.
heartbeat() {
	local what=$1 started=$SECONDS ticker status=0
	shift
	# Without the lock's descriptor: a `sleep` outliving the kill must not hold the lock.
	(exec 8>&-; while sleep 30; do say "  ... still $what ($(fmt_duration $((SECONDS - started))))"; done) &
	ticker=$!
	"$@" || status=$?
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	return "$status"
}

bah() { buildah --root "$cache/store" --runroot "$cache/run" --storage-driver overlay "$@"; }

ref() {
	case $1 in
	runtime | operator | ray) echo "localhost/forkless-$1:$version" ;;
	pause) echo "localhost/forkless-pause:$k8s_version" ;;
	*)
		say "unknown image $1 (runtime, operator or pause)"
		exit 2
		;;
	esac
}
archive() { echo "$cache/archives/$(ref "$1" | sed 's|^localhost/||; s|:|-|').tar"; }
# The image's size as a registry would store it (gzip layers: the archive) and unpacked.
size_of() {
	printf '%s compressed, %s unpacked' "$(du -h "$(archive "$1")" | cut -f1)" \
		"$(bah images --noheading --format '{{.Size}}' "$(ref "$1")" 2>/dev/null)"
}
have_image() { [[ -n $(bah images --quiet "$1" 2>/dev/null) ]]; }

# ---------------------------------------------------------------- inputs

base_image() {
	if have_image "$base_ref"; then
		return
	fi
	say "base: mmdebstrap $suite minbase + $base_packages ($debian_mirror) ..."
	local started=$SECONDS tar=$cache/tmp/base-$suite.tar container
	mkdir -p "$cache/tmp"
	heartbeat "making the $suite root filesystem" \
		mmdebstrap --quiet --variant=minbase --mode=root --include="$base_packages" "$suite" "$tar" \
		"deb $debian_mirror $suite main" "deb $debian_mirror $suite-updates main" \
		"deb http://deb.debian.org/debian-security $suite-security main"
	container=$(bah from scratch)
	bah add --quiet "$container" "$tar" / >/dev/null
	bah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--env LANG=C.UTF-8 "$container"
	bah commit --quiet --rm "$container" "$base_ref" >/dev/null
	rm -f "$tar"
	say "base: $base_ref in $(fmt_duration $((SECONDS - started)))"
}

# The wheels of every package the images install, for the base's python; `pip download`
# keeps the files already in the directory, so this downloads only what is new.
download_wheels() {
	local requirements=$cache/tmp/requirements.txt started=$SECONDS
	mkdir -p "$cache/tmp" "$wheels"
	python3 - "$root/pyproject.toml" >"$requirements" <<-'EOF'
		import sys, tomllib
		extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
		print("\n".join(extras["runtime"] + extras["operator"] + ["setuptools==84.2.1", "ray[serve]==2.60.0"]))
	EOF
	local stamp=$wheels/.forkless-complete digest
	digest=$(cat "$requirements" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)
	if [[ -f $stamp && $(cat "$stamp") == "$digest" ]]; then
		return
	fi
	local pip=(python3 -m pip)
	[[ -x $root/.venv/bin/pip ]] && pip=("$root/.venv/bin/pip")
	say "wheels: pip download of the pinned runtime and operator packages into $wheels ..."
	# Every manylinux tag glibc 2.36 (bookworm) runs; pip takes only the tags it is given.
	local platforms=(--platform manylinux2014_x86_64) minor
	for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
	heartbeat "downloading wheels" "${pip[@]}" download --quiet --progress-bar off --dest "$wheels" \
		--only-binary=:all: --python-version "$base_python" --implementation cp "${platforms[@]}" \
		--constraint "$root/constraints.txt" --requirement "$requirements"
	echo "$digest" >"$stamp"
	say "wheels: $(du -sh "$wheels" | cut -f1) in $wheels ($(fmt_duration $((SECONDS - started))))"
}

# A hash of everything an image is built from.
inputs_hash() {
	local image=$1
	{
		echo "$image $version $k8s_version"
		case $image in
		pause)
			gcc --version | head -n 1
			cat "$(pause_source)"
			;;
		*)
			bah images --quiet --no-trunc "$base_ref"
			cd "$root"
			# What .dockerignore lets into the build context.
			[[ $image != ray ]] || bah images --quiet --no-trunc "$(ref runtime)"
			find "$(dockerfile "$image")" pyproject.toml constraints.txt README.md \
				runtime/forkless_runtime operator/forkless_operator \
				-type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
			;;
		esac
	} | sha256sum | cut -d' ' -f1
}

pause_source() {
	local dir
	dir=$(cd "$root/hack/k8s/kubernetes" && go mod download -json k8s.io/kubernetes | jq -r .Dir)
	echo "$dir/build/pause/linux/pause.c"
}

# ---------------------------------------------------------------- builds

build_pause() {
	local work=$cache/tmp/pause container
	mkdir -p "$work"
	gcc -Os -Wall -Werror -static -DVERSION="$k8s_version" -o "$work/pause" "$(pause_source)"
	strip "$work/pause"
	container=$(bah from scratch)
	bah copy --quiet "$container" "$work/pause" /pause >/dev/null
	bah config --entrypoint '["/pause"]' --user 65535:65535 "$container"
	bah commit --quiet --rm "$container" "$(ref pause)" >/dev/null
	rm -rf "$work"
}

dockerfile() { if [[ $1 == ray ]]; then echo runtime/Dockerfile.ray; else echo "$1/Dockerfile"; fi; }

build_dockerfile() {
	local image=$1
	download_wheels
	say "$image: buildah bud -f $(dockerfile "$image") (BASE_IMAGE=$base_ref, wheels from $wheels) ..."
	(cd "$root" && heartbeat "building $(ref "$image")" \
		bah bud --quiet --layers --network host --isolation chroot \
		--build-arg BASE_IMAGE="$base_ref" --build-arg RUNTIME_IMAGE="$(ref runtime)" \
		--build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 \
		--volume "$wheels:/wheels:ro" \
		--file "$(dockerfile "$image")" --tag "$(ref "$image")" .) >/dev/null
}

build() {
	local image=$1 hash target stamp started=$SECONDS
	target=$(archive "$image")
	stamp=$target.inputs
	mkdir -p "$cache/archives"
	[[ $image == pause ]] || base_image
	[[ $image != ray ]] || build runtime # its base
	hash=$(inputs_hash "$image")
	if [[ -f $target && -f $stamp && $(cat "$stamp") == "$hash" ]] && have_image "$(ref "$image")"; then
		say "$image: $(ref "$image") is up to date ($(size_of "$image"))"
		return
	fi
	case $image in
	pause) build_pause ;;
	*) build_dockerfile "$image" ;;
	esac
	# Uncompressed layers: compressing gigabytes of CUDA libraries costs minutes on two cores,
	# and the archive only travels to this machine's containerd.
	rm -f "$target" "$stamp"
	heartbeat "exporting $(ref "$image")" \
		bah push --quiet --disable-compression "$(ref "$image")" "oci-archive:$target.partial:$(ref "$image")"
	mv "$target.partial" "$target"
	echo "$hash" >"$stamp"
	# Earlier builds of this image, now untagged, would keep gigabytes each.
	bah rmi --prune >/dev/null 2>&1 || true
	say "$image: built $(ref "$image") in $(fmt_duration $((SECONDS - started))): $(size_of "$image")"
}

# ---------------------------------------------------------------- import

containerd_socket() { echo "$cluster/node/containerd/containerd.sock"; }
ctr_k8s() { ctr --address "$(containerd_socket)" --namespace k8s.io "$@"; }
node_running() { [[ -S $(containerd_socket) ]] && ctr_k8s version >/dev/null 2>&1; }

# The manifest digest an archive holds, and the one containerd has under the same name.
archive_digest() { tar -xOf "$1" index.json | jq -r '.manifests[0].digest'; }
imported_digest() {
	ctr_k8s images ls "name==$1" 2>/dev/null | awk -v ref="$1" '$1 == ref { print $3 }'
}

import() {
	local image=$1 target started=$SECONDS
	target=$(archive "$image")
	[[ -f $target ]] || {
		say "$image: no archive $target; build it first (hack/images.sh build $image)"
		return 1
	}
	if [[ $(imported_digest "$(ref "$image")") == "$(archive_digest "$target")" ]]; then
		say "$image: $(ref "$image") already in the node's containerd"
		return
	fi
	# containerd 1.6 reuses a layer snapshot it finds, without holding it: when the image this
	# import replaces was the last to use it, the garbage collector can remove it mid-import
	# ("parent snapshot ... does not exist"). A second try unpacks that layer afresh.
	local try
	for try in 1 2 3; do
		heartbeat "importing $(ref "$image")" ctr_k8s images import "$target" >/dev/null && break
		((try < 3)) || return 1
		say "$image: import failed (try $try of 3); trying again"
		sleep 2
	done
	say "$image: imported $(ref "$image") into the node's containerd in $(fmt_duration $((SECONDS - started)))"
}

list() {
	local image target state
	for image in runtime operator ray pause; do
		target=$(archive "$image")
		state=missing
		[[ -f $target ]] && state="built, $(size_of "$image")"
		printf '%-9s %-45s %s\n' "$image" "$(ref "$image")" "$state"
	done
}

main() {
	local command=${1:-all}
	case $command in
	list)
		list
		return
		;;
	ref)
		ref "${2:?hack/images.sh ref IMAGE}"
		return
		;;
	build | import | all) shift || true ;;
	runtime | operator | ray | pause) command=all ;;
	*)
		sed -n '/^# Usage:/,/^# Environment:/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
		exit 2
		;;
	esac
	local images=("$@")
	((${#images[@]})) || images=(runtime operator)
	local image
	for image in "${images[@]}"; do ref "$image" >/dev/null; done

	if [[ $command != import ]]; then
		"$root/hack/host-packages.sh"
		mkdir -p "$cache"
		# One build at a time, also across checkouts sharing the cache.
		exec 8>"$cache/.lock"
		flock -n 8 || {
			say "another hack/images.sh holds $cache/.lock; waiting for it"
			flock 8
		}
		for image in "${images[@]}"; do build "$image"; done
	fi
	if [[ $command != build ]]; then
		if node_running; then
			for image in "${images[@]}"; do import "$image"; done
		elif [[ $command == import ]]; then
			say "no real node runs in $cluster (hack/cluster.sh up starts one)"
			return 1
		fi
	fi
}

main "$@"
