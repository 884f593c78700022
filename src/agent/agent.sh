#!/bin/sh
# asimov agent: runs ONE job in ONE instance folder and records what happens there.
#
#   agent.sh start ROOT      claim the folder and launch the supervisor detached
#   agent.sh supervise ROOT  (internal) setup, then run, heartbeat, max_duration
#   agent.sh stop ROOT       stop the job's process group; idempotent
#   agent.sh status ROOT     print every state file and the log tail in one block
#
# ROOT holds: agent.sh, spec/ (written by asimov: tag, run, env, secrets (0600),
# setup.sh, run.sh, max_duration, outputs), work/ (the job's working folder) and the
# state files this script writes: status, pid, run_pid, heartbeat, started_at,
# finished_at, exit_code, log. The job's own metrics.jsonl (ASIMOV_METRICS) is there too.
#
# The agent's own files are private (umask 077); the job runs with the umask the agent
# was started with (ASIMOV_JOB_UMASK, the user's). The log is capped at LOG_CAP bytes:
# past it, the oldest output goes, the newest LOG_KEEP bytes stay behind a line that
# says so (checked every second while the job runs, and when it ends).
#
# Plain POSIX sh (dash, busybox ash): no bashisms. Secrets are only ever read from
# spec/secrets with `.`, never passed on a command line.

set -u

# Seconds between TERM and KILL when stopping or timing out a job.
GRACE=${ASIMOV_GRACE:-5}
HEARTBEAT_EVERY=5
LOG_CAP=16777216
LOG_KEEP=$((LOG_CAP / 2))

ASIMOV_JOB_UMASK=${ASIMOV_JOB_UMASK:-$(umask)}
export ASIMOV_JOB_UMASK
umask 077
MARKER='--- asimov log tail ---'

die() {
	printf 'asimov agent: %s\n' "$*" >&2
	exit 2
}

now() { date +%s; }

# Writes a state file atomically, so a reader never sees half a value.
put() {
	printf '%s\n' "$2" >"$ROOT/.$1.tmp" && mv -f "$ROOT/.$1.tmp" "$ROOT/$1"
}

get() {
	if [ -f "$ROOT/$1" ]; then cat "$ROOT/$1" 2>/dev/null; fi
}

finished() {
	case $(get status) in
	succeeded | failed | timeout | stopped) return 0 ;;
	esac
	return 1
}

alive() {
	[ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

# Signals a whole process group, and its leader in case it has not yet become one.
killgroup() {
	[ -n "$2" ] || return 0
	kill -s "$1" -- "-$2" 2>/dev/null
	kill -s "$1" -- "$2" 2>/dev/null
	return 0
}

# Keeps the log under LOG_CAP: its last LOG_KEEP bytes, rewritten in place (the job
# appends, so its next write lands after them; what it writes meanwhile may be lost).
cap_log() {
	size=$(wc -c <"$ROOT/log" 2>/dev/null | tr -d ' ')
	[ "${size:-0}" -gt "$LOG_CAP" ] || return 0
	tail -c "$LOG_KEEP" "$ROOT/log" >"$ROOT/.log.keep" || return 0
	{
		printf '[asimov: the log passed %s bytes; older output was dropped]\n' "$LOG_CAP"
		cat "$ROOT/.log.keep"
	} >"$ROOT/log"
	rm -f "$ROOT/.log.keep"
}

# Short sleep where the system's sleep takes fractions, else a second.
nap() {
	sleep 0.2 2>/dev/null || sleep 1
}

quote() {
	printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

cmd_start() {
	[ -d "$ROOT" ] || die "no instance folder $ROOT"
	[ -f "$ROOT/agent.sh" ] || die "no agent.sh in $ROOT"
	# noclobber makes the claim atomic: of two concurrent starts only one launches.
	if ! (set -C && echo starting >"$ROOT/status") 2>/dev/null; then
		exit 0
	fi
	tag=$(get spec/tag)
	session=$(printf '%s' "${tag:-asimov-$$}" | tr -c 'A-Za-z0-9_-' '_')
	if [ -z "${ASIMOV_NO_TMUX:-}" ] && command -v tmux >/dev/null 2>&1 &&
		tmux new-session -d -s "$session" \
			"ASIMOV_JOB_UMASK=$ASIMOV_JOB_UMASK exec sh $(quote "$ROOT/agent.sh") supervise $(quote "$ROOT")" \
			</dev/null >/dev/null 2>&1; then
		put launcher "tmux $session"
	elif command -v setsid >/dev/null 2>&1; then
		# A new session has no controlling terminal to hang up, and the supervisor
		# ignores SIGHUP itself: no nohup needed (busybox often lacks it).
		put launcher setsid
		setsid sh "$ROOT/agent.sh" supervise "$ROOT" </dev/null >>"$ROOT/agent.out" 2>&1 &
	else
		put launcher background
		sh "$ROOT/agent.sh" supervise "$ROOT" </dev/null >>"$ROOT/agent.out" 2>&1 &
	fi
	exit 0
}

# Heartbeat and max_duration watchdog; ends when the supervisor ($1) does.
monitor() {
	started=$(now)
	max=$(get spec/max_duration)
	n=0
	killed_at=
	while kill -0 "$1" 2>/dev/null; do
		if [ "$n" -eq 0 ]; then put heartbeat "$(now)"; fi
		cap_log
		n=$(((n + 1) % HEARTBEAT_EVERY))
		if [ -n "$max" ] && [ ! -e "$ROOT/timed_out" ] &&
			[ $(($(now) - started)) -ge "$max" ]; then
			: >"$ROOT/timed_out"
			killgroup TERM "$(get run_pid)"
			killed_at=$(now)
		fi
		if [ -n "$killed_at" ] && [ $(($(now) - killed_at)) -ge "$GRACE" ]; then
			killgroup KILL "$(get run_pid)"
			killed_at=
		fi
		sleep 1
	done
}

stopping() {
	[ -e "$ROOT/stop_requested" ] || [ -e "$ROOT/timed_out" ]
}

# Runs spec/$1.sh in its own process group (setsid), output appended to the log, with
# the job's umask.
phase() {
	umask "$ASIMOV_JOB_UMASK"
	if command -v setsid >/dev/null 2>&1; then
		setsid sh "$ROOT/spec/$1.sh" </dev/null >>"$ROOT/log" 2>&1 &
	else
		sh "$ROOT/spec/$1.sh" </dev/null >>"$ROOT/log" 2>&1 &
	fi
	child=$!
	umask 077
	put run_pid "$child"
	# A stop that came before run_pid existed is honoured here.
	if stopping; then killgroup TERM "$child"; fi
	wait "$child"
}

cmd_supervise() {
	tag=$(get spec/tag)
	# Re-exec so that the supervisor's own environment (what /proc/PID/environ shows)
	# names its instance: the local provider finds every process of an instance by it.
	if [ "${ASIMOV_INSTANCE:-}" != "$tag" ] || [ "${ASIMOV_ROOT:-}" != "$ROOT" ]; then
		ASIMOV_INSTANCE=$tag
		ASIMOV_ROOT=$ROOT
		export ASIMOV_INSTANCE ASIMOV_ROOT
		exec sh "$ROOT/agent.sh" supervise "$ROOT"
	fi
	trap '' HUP
	put pid $$
	put started_at "$(now)"
	: >>"$ROOT/log"
	monitor $$ &
	mon=$!
	# Launched in tmux, the pane shows the job's output as it is written, for
	# `asimov attach`; it ends with this supervisor (GNU tail's --pid, else killed below).
	viewer=
	if [ -t 1 ]; then
		if tail --pid=$$ -n 0 /dev/null >/dev/null 2>&1; then
			tail --pid=$$ -n +1 -f "$ROOT/log" 2>/dev/null &
		else
			tail -n +1 -f "$ROOT/log" 2>/dev/null &
		fi
		viewer=$!
	fi

	ASIMOV_RUN=$(get spec/run)
	export ASIMOV_RUN
	if [ -f "$ROOT/spec/env" ]; then . "$ROOT/spec/env"; fi
	if [ -f "$ROOT/spec/secrets" ]; then . "$ROOT/spec/secrets"; fi
	mkdir -p "$ROOT/work"
	cd "$ROOT/work" || die "cannot enter $ROOT/work"
	# A restored checkpoint (spec/env names it as the job wrote its path): absolute for
	# the job, a relative path being inside work/ as for outputs.
	case ${ASIMOV_RESUME_FROM:-} in
	'' | /*) ;;
	'~') ASIMOV_RESUME_FROM=$HOME ;;
	'~/'*) ASIMOV_RESUME_FROM=$HOME/${ASIMOV_RESUME_FROM#??} ;;
	*) ASIMOV_RESUME_FROM=$PWD/$ASIMOV_RESUME_FROM ;;
	esac
	# The job's metrics, one JSON object a line; the controller reads the last ones.
	ASIMOV_METRICS=$ROOT/metrics.jsonl
	export ASIMOV_METRICS

	rc=0
	if [ -s "$ROOT/spec/setup.sh" ] && ! stopping; then
		finished || put status setup
		phase setup
		rc=$?
		# The controller reads this line from the collected log (SETUP_FAILED_MARKER).
		[ "$rc" -eq 0 ] || echo "asimov: setup failed with exit code $rc" >>"$ROOT/log"
	fi
	if [ "$rc" -eq 0 ] && ! stopping; then
		finished || put status running
		phase run
		rc=$?
	fi
	# Whatever the job left behind in its group ends with it.
	killgroup TERM "$(get run_pid)"
	cap_log

	if [ -e "$ROOT/timed_out" ]; then
		state=timeout
		rc=124
	elif [ -e "$ROOT/stop_requested" ]; then
		state=stopped
	elif [ "$rc" -eq 0 ]; then
		state=succeeded
	else
		state=failed
	fi
	if ! finished; then
		put exit_code "$rc"
		put finished_at "$(now)"
		put status "$state"
	fi
	kill "$mon" 2>/dev/null
	if [ -n "$viewer" ]; then kill "$viewer" 2>/dev/null; fi
	# A provider's end-of-run hook (a cloud instance that destroys itself with its own
	# key), detached so that it outlives this supervisor.
	if [ -f "$ROOT/on_end.sh" ]; then
		if command -v setsid >/dev/null 2>&1; then
			setsid sh "$ROOT/on_end.sh" "$ROOT" </dev/null >>"$ROOT/on_end.log" 2>&1 &
		else
			sh "$ROOT/on_end.sh" "$ROOT" </dev/null >>"$ROOT/on_end.log" 2>&1 &
		fi
	fi
	exit 0
}

# Waits up to $1 seconds for the run to finish.
await_finish() {
	deadline=$(($(now) + $1))
	while ! finished && [ "$(now)" -lt "$deadline" ]; do
		alive "$(get pid)" || return 1
		nap
	done
	finished
}

cmd_stop() {
	[ -e "$ROOT/status" ] || exit 0
	finished && exit 0
	: >"$ROOT/stop_requested"
	killgroup TERM "$(get run_pid)"
	if await_finish "$GRACE"; then exit 0; fi
	killgroup KILL "$(get run_pid)"
	if await_finish 2; then exit 0; fi
	# The supervisor is gone or stuck: record the stop ourselves.
	killgroup KILL "$(get pid)"
	if ! finished; then
		[ -f "$ROOT/exit_code" ] || put exit_code 137
		put finished_at "$(now)"
		put status stopped
	fi
	exit 0
}

cmd_status() {
	[ -e "$ROOT/status" ] || exit 0
	for key in status exit_code pid run_pid heartbeat started_at finished_at; do
		if [ -f "$ROOT/$key" ]; then printf '%s=%s\n' "$key" "$(get "$key")"; fi
	done
	if alive "$(get pid)"; then echo alive=1; else echo alive=0; fi
	printf 'now=%s\n' "$(now)"
	printf '%s\n' "$MARKER"
	if [ -f "$ROOT/log" ]; then tail -c 4096 "$ROOT/log"; fi
	exit 0
}

[ $# -eq 2 ] || die "usage: agent.sh start|supervise|stop|status ROOT"
ROOT=$2
case $ROOT in
/*) ;;
*) ROOT=$(cd "$ROOT" && pwd) || die "no instance folder $2" ;;
esac

case $1 in
start) cmd_start ;;
supervise) cmd_supervise ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) die "unknown command $1" ;;
esac
