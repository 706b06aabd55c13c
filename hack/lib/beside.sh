# shellcheck shell=bash
# What the scripts that run a process beside the local cluster share (hack/coredns.sh, hack/kuberay.sh,
# hack/keda.sh):
# the state directory, pid files whose entries count only while they are still ours, free ports, a
# launch that records a process once it runs, and a wait that shows the process's log when it gives up.
# Source it after defining say(); set `state`, and `component` (the subdirectory of the state directory
# that holds pids and the log).

state_dir() {
	local dir=${1:-$root/.cluster}
	[[ $dir == /* ]] || dir=$PWD/$dir
	echo "$dir"
}

# Every process recorded in <state>/<component>/pids is alive and ours.
running() {
	[[ -f $state/$component/pids ]] || return 1
	local _ pid
	while read -r _ pid; do ours "$pid" || return 1; done <"$state/$component/pids"
}

# A port below the kernel's ephemeral range that nothing listens on and that is not among "$@"
# (as hack/cluster.sh picks them).
free_port() {
	local used port
	used=" $(ss -Htan | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }') $* "
	while port=$((20000 + RANDOM % 12000)); [[ $used == *" $port "* ]]; do :; done
	echo "$port"
}

# shellcheck source=hack/lib/process.sh
source "$root/hack/lib/process.sh"

# launch NAME LOG COMMAND...: start COMMAND in a session of its own, its output in LOG, record it in
# <state>/<component>/pids, and return once it runs (await_exec).
launch() {
	local name=$1 log=$2
	shift 2
	mkdir -p "$state/$component"
	setsid "$@" >"$log" 2>&1 </dev/null &
	echo "$name $!" >>"$state/$component/pids"
	await_exec "$!"
}

# wait_for WHAT SECONDS LOG COMMAND...: until COMMAND succeeds; on the deadline, or once a recorded
# process has exited (when one is recorded), say so with LOG's last lines and fail.
wait_for() {
	local what=$1 seconds=$2 log=$3
	shift 3
	local deadline=$((SECONDS + seconds))
	until "$@" >/dev/null 2>&1; do
		if [[ -f $state/$component/pids ]] && ! running; then
			say "FAILED: $component exited before $what; last lines of $log:"
		elif ((SECONDS >= deadline)); then
			say "FAILED: no $what after ${seconds}s; last lines of $log:"
		else
			sleep 0.2
			continue
		fi
		tail -n 20 "$log" >&2 || true
		return 1
	done
	say "$what"
}

# Stop every recorded process that is still ours: TERM, up to 5 s, then KILL.
stop_recorded() {
	[[ -f $state/$component/pids ]] || return 0
	local name pid
	while read -r name pid; do
		if ours "$pid"; then
			kill "$pid" 2>/dev/null || true
			for _ in $(seq 50); do ours "$pid" || break; sleep 0.1; done
			ours "$pid" && kill -9 "$pid" 2>/dev/null || true
			say "stopped $name"
		fi
	done <"$state/$component/pids"
	rm -f "$state/$component/pids"
}
