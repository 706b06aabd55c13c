# shellcheck shell=bash
# await_exec PID: return once the process just started with `setsid ... &` has exec'ed its command, or
# has exited (the caller's wait then reports it with its log), at most 5 s. Until that exec the child's
# command line is the starting script's, which need not name the state directory, so the caller's
# `ours` (a pid counts while its command line names the state directory) would take a process still
# starting for one that had exited: CI failed every cluster test so, on CoreDNS and on the kubelet.
# Source it from a script that defines ours().
await_exec() {
	local pid=$1
	for _ in $(seq 100); do
		ours "$pid" && return 0
		[[ -s /proc/$pid/cmdline ]] || return 0
		sleep 0.05
	done
}
