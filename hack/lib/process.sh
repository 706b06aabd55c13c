# shellcheck shell=bash
# Which recorded processes are still ours, for hack/cluster.sh and the scripts that run a process
# beside the cluster (hack/lib/beside.sh). Source it after setting `state`: every process we start
# gets a path in the state directory on its command line, and that is how a recorded pid is told from
# one the kernel has since given to an unrelated process (neither reported nor killed).
#
# A process is read at three moments where its command line does not name the state directory yet
# is ours: before `setsid` has exec'ed (the command line is the starting script's), and during each
# exec (setsid -> env -> the binary), when /proc/PID/cmdline reads empty until the new image's
# arguments are mapped. CI failed every cluster test on the first (a starting kubelet taken for an
# exited one) and the KEDA test on the second (an adapter "exited" a moment after it was launched).

# The process's state letter from /proc/PID/stat (R, S, D, Z, ...), empty once it is gone. The
# command name in parentheses may hold spaces, so the state is read after its closing parenthesis.
proc_state() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
	stat=${stat##*) }
	echo "${stat%% *}"
}

# ours PID: PID runs and its command line names the state directory. An empty command line of a live
# process (an exec in progress) is read again for up to 1 s before the answer is no.
ours() {
	local pid=$1 line
	for _ in $(seq 20); do
		line=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
		if [[ -n $line ]]; then
			[[ $line == *"$state/"* ]]
			return
		fi
		case $(proc_state "$pid") in '' | Z | X) return 1 ;; esac
		sleep 0.05
	done
	return 1
}

# await_exec PID: return once the process just started with `setsid ... &` is ours (it has exec'ed),
# or is gone (the caller's wait then reports it with its log); at most 5 s.
await_exec() {
	local pid=$1
	for _ in $(seq 100); do
		ours "$pid" && return 0
		case $(proc_state "$pid") in '' | Z | X) return 0 ;; esac
		sleep 0.05
	done
}
