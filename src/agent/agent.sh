#!/bin/sh
# asimov agent: runs ONE job in ONE instance folder and records what happens there.
#
#   agent.sh start ROOT      claim the folder and launch the supervisor detached
#   agent.sh supervise ROOT  (internal) setup, then run, heartbeat, max_duration
#   agent.sh stop ROOT       stop the job's process group; idempotent
#   agent.sh status ROOT     print every state file and the log tail in one block
#   agent.sh sync-checkpoint ROOT  sync the checkpoint folder to S3 now
#   agent.sh sync-final ROOT       the final S3 sync (checkpoint and outputs), once:
#                                  waits for one in flight, reports one done
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
# With artifacts.to s3:// the spec also holds s3 (S3_BASE, the URL of the run's
# objects; S3_CHECKPOINT, S3_RESTORE, S3_NEXT, S3_ATTEMPT), s3_outputs ("path<TAB>name"
# lines) and s3.curl (0600: the keys, read by curl -K, never on a command line). The
# agent restores S3_RESTORE before setup and makes the final sync itself when the job
# ends, before the provider's end-of-run hook: a teardown by either side waits for it.
# The layout in the bucket is described in src/artifacts/s3.rs.
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

# --- S3 -----------------------------------------------------------------------------
TAB=$(printf '\t')
# Tries of a final sync before it counts as failed (curl retries each request too).
SYNC_TRIES=${ASIMOV_SYNC_TRIES:-3}

# The largest file one S3 PUT takes (5 GiB). The agent's curl uploads are single PUTs
# (no multipart from POSIX sh), so a bigger file fails the sync, saying why.
S3_PUT_MAX=${ASIMOV_S3_PUT_MAX:-5368709120}

# True (and the reason in sync/error) when file $1 is over S3_PUT_MAX.
over_put_max() {
	size=$(wc -c <"$1" | tr -d ' ')
	[ "$size" -gt "$S3_PUT_MAX" ] || return 1
	echo "asimov: $1 is $size bytes, over the $S3_PUT_MAX bytes one S3 upload takes (the agent does not upload in parts): keep files under 5 GiB or sync without S3" >>"$ROOT/sync/error"
}

# put, for the sync state in sync/.
sput() {
	printf '%s\n' "$2" >"$ROOT/sync/.$1.tmp" && mv -f "$ROOT/sync/.$1.tmp" "$ROOT/sync/$1"
}

s3_enabled() {
	[ -f "$ROOT/spec/s3" ] && [ -f "$ROOT/spec/s3.curl" ]
}

# curl signing with the keys of spec/s3.curl; errors to sync/error.
s3curl() {
	curl -K "$ROOT/spec/s3.curl" "$@" </dev/null 2>>"$ROOT/sync/error"
}

# A path on the instance made absolute: relative ones are inside work/.
abspath() {
	case $1 in
	/*) printf '%s' "$1" ;;
	'~') printf '%s' "$HOME" ;;
	'~/'*) printf '%s/%s' "$HOME" "${1#??}" ;;
	*) printf '%s/work/%s' "$ROOT" "$1" ;;
	esac
}

# Percent-encodes a key for a URL, all but unreserved characters and '/'.
urlenc() {
	case $1 in
	*[!A-Za-z0-9._~/-]*)
		printf '%s' "$1" | od -An -v -tx1 | awk '
			BEGIN { for (i = 0; i < 256; i++) v[sprintf("%02x", i)] = i }
			{ for (f = 1; f <= NF; f++) { c = v[$f]
				if ((c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) ||
					c == 45 || c == 46 || c == 95 || c == 126 || c == 47) printf "%c", c
				else printf "%%%s", toupper($f) } }'
		;;
	*) printf '%s' "$1" ;;
	esac
}

# Uploads the files of folder $1 that changed since the sync recorded in state $3
# ($3.list: "<gen><TAB><path>" lines, the last listing; $3.mark: touched when that sync
# began) to $2/<path>, and writes $3.next: the new listing, changed files under
# generation $4, the others as they were. Counts into UPLOADED and BYTES.
upload_changed() {
	dir=$1 url=$2 state=$3 gen=$4
	: >"$state.mark.next"
	# A file written in the mark's second is written after it: wait that second out,
	# so that the next sync's -newer finds what changes from here on.
	sleep 1
	[ -f "$state.list" ] || : >"$state.list"
	if [ -f "$state.mark" ]; then
		(cd "$dir" && find . -type f -newer "$state.mark") >"$state.changed" || return 1
	else
		(cd "$dir" && find . -type f) >"$state.changed" || return 1
	fi
	(cd "$dir" && find . -type f) >"$state.files" || return 1
	awk -F "$TAB" -v gen="$gen" '
		FILENAME == ARGV[1] { prev[$2] = $1; next }
		FILENAME == ARGV[2] { changed[substr($0, 3)] = 1; next }
		{ p = substr($0, 3)
		  if ((p in changed) || !(p in prev)) print gen "\t" p; else print prev[p] "\t" p }' \
		"$state.list" "$state.changed" "$state.files" >"$state.unsorted" || return 1
	# Sorted, so that an unchanged folder gives the same listing whatever find's order.
	LC_ALL=C sort "$state.unsorted" >"$state.next" || return 1
	: >"$state.vanished"
	while IFS=$TAB read -r g p; do
		[ "$g" = "$gen" ] || continue
		# Gone since the listing (a temporary file renamed into place): not part of
		# this checkpoint.
		if [ ! -f "$dir/$p" ]; then
			printf '%s\n' "$g$TAB$p" >>"$state.vanished"
			continue
		fi
		over_put_max "$dir/$p" && return 1
		s3curl -o /dev/null -T "$dir/$p" "$url/$(urlenc "$p")" || return 1
		UPLOADED=$((UPLOADED + 1))
		BYTES=$((BYTES + $(wc -c <"$dir/$p")))
	done <"$state.next"
	if [ -s "$state.vanished" ]; then
		grep -v -x -F -f "$state.vanished" "$state.next" >"$state.kept"
		mv -f "$state.kept" "$state.next"
	fi
}

commit_state() {
	mv -f "$1.next" "$1.list" && mv -f "$1.mark.next" "$1.mark"
}

# Makes the checkpoint folder's current content a complete checkpoint in S3: changed
# files into a new generation's folder, then its manifest, last. Sets CHECKPOINT.
sync_checkpoint() {
	CHECKPOINT=$(get sync/ckpt_last)
	[ -n "${S3_CHECKPOINT:-}" ] || return 0
	dir=$(abspath "$S3_CHECKPOINT")
	[ -d "$dir" ] || return 0
	n=$(get sync/ckpt_next)
	n=${n:-$S3_NEXT}
	gen=$(printf '%08d-a%s' "$n" "$S3_ATTEMPT")
	before=$UPLOADED
	state=$ROOT/sync/ckpt
	upload_changed "$dir" "$S3_BASE/_checkpoints/objects/$gen" "$state" "$gen" || return 1
	# Nothing changed: the last checkpoint is this one.
	if [ "$UPLOADED" -eq "$before" ] && [ -n "$CHECKPOINT" ] && cmp -s "$state.next" "$state.list"; then
		commit_state "$state"
		return 0
	fi
	s3curl -o /dev/null -T "$state.next" "$S3_BASE/_checkpoints/manifests/$gen" || return 1
	commit_state "$state"
	sput ckpt_next $((n + 1))
	sput ckpt_last "$gen"
	CHECKPOINT=$gen
}

# Uploads the outputs (spec/s3_outputs) that changed since the last sync.
sync_outputs() {
	[ -f "$ROOT/spec/s3_outputs" ] || return 0
	i=0
	while IFS=$TAB read -r path name; do
		i=$((i + 1))
		src=$(abspath "$path")
		if [ -d "$src" ]; then
			upload_changed "$src" "$S3_BASE/$(urlenc "$name")" "$ROOT/sync/out.$i" out || return 1
			commit_state "$ROOT/sync/out.$i"
		elif [ -f "$src" ]; then
			over_put_max "$src" && return 1
			s3curl -o /dev/null -T "$src" "$S3_BASE/$(urlenc "$name")" || return 1
			UPLOADED=$((UPLOADED + 1))
			BYTES=$((BYTES + $(wc -c <"$src")))
		else
			echo "asimov: output $path not found; not synced" >>"$ROOT/sync/error"
		fi
	done <"$ROOT/spec/s3_outputs"
}

# Downloads checkpoint S3_RESTORE into the checkpoint folder (once per instance).
restore_checkpoint() {
	[ -n "${S3_RESTORE:-}" ] && [ -n "${S3_CHECKPOINT:-}" ] || return 0
	[ -f "$ROOT/sync/restored" ] && return 0
	dir=$(abspath "$S3_CHECKPOINT")
	mkdir -p "$dir" || return 1
	s3curl -o "$ROOT/sync/ckpt.list" "$S3_BASE/_checkpoints/manifests/$S3_RESTORE" || return 1
	while IFS=$TAB read -r g p; do
		case /$p/ in */../* | //*) echo "asimov: bad path in checkpoint: $p" >>"$ROOT/sync/error" && return 1 ;; esac
		case $p in */*) mkdir -p "$dir/${p%/*}" || return 1 ;; esac
		s3curl -o "$dir/$p" "$S3_BASE/_checkpoints/objects/$g/$(urlenc "$p")" || return 1
	done <"$ROOT/sync/ckpt.list"
	# What was restored is in S3 already: the next sync sends only what changes.
	: >"$ROOT/sync/ckpt.mark"
	sput ckpt_last "$S3_RESTORE"
	: >"$ROOT/sync/restored"
}

# One syncer at a time: a symlink naming the holder's pid (made atomically); a dead
# holder's lock is taken over.
sync_lock() {
	while ! ln -s "$$" "$ROOT/sync.lock" 2>/dev/null; do
		holder=$(readlink "$ROOT/sync.lock" 2>/dev/null)
		if [ -n "$holder" ] && ! alive "$holder"; then
			rm -f "$ROOT/sync.lock"
			continue
		fi
		nap
	done
}

# Only the holder's own lock goes (a signal may come while waiting for another's).
sync_unlock() {
	if [ "$(readlink "$ROOT/sync.lock" 2>/dev/null)" = "$$" ]; then rm -f "$ROOT/sync.lock"; fi
}

s3_load() {
	mkdir -p "$ROOT/sync"
	. "$ROOT/spec/s3"
}

# The final sync, once: a done one is reported as it was; a failed one is tried again.
final_sync() {
	case $(get sync/final) in done*) return 0 ;; esac
	tries=0
	while :; do
		UPLOADED=0
		BYTES=0
		: >"$ROOT/sync/error"
		if sync_checkpoint && sync_outputs; then
			sput final "done $UPLOADED $BYTES ${CHECKPOINT:--}"
			return 0
		fi
		tries=$((tries + 1))
		[ "$tries" -lt "$SYNC_TRIES" ] || break
		sleep $((tries * 2))
	done
	sput final "failed $(tail -n 1 "$ROOT/sync/error" | tr -d '\r')"
	return 1
}

print_final() {
	set -- $(get sync/final)
	case ${1:-} in
	done) printf 'result=done\nfiles=%s\nbytes=%s\ncheckpoint=%s\n' "$2" "$3" "$4" ;;
	failed) shift; printf 'result=failed\nerror=%s\n' "$*" ;;
	*) printf 'result=failed\nerror=no final sync recorded\n' ;;
	esac
}

cmd_sync() {
	s3_enabled || die "no S3 target for this run"
	s3_load
	trap 'sync_unlock; exit 1' HUP INT TERM
	sync_lock
	if [ "$1" = final ]; then
		final_sync
		sync_unlock
		print_final
		exit 0
	fi
	# After the final sync, nothing is left to sync: report it.
	if [ -n "$(get sync/final)" ]; then
		sync_unlock
		print_final
		exit 0
	fi
	UPLOADED=0
	BYTES=0
	: >"$ROOT/sync/error"
	if ! sync_checkpoint; then
		sync_unlock
		die "sync checkpoint: $(tail -n 1 "$ROOT/sync/error")"
	fi
	sync_unlock
	printf 'result=done\nfiles=%s\nbytes=%s\ncheckpoint=%s\n' "$UPLOADED" "$BYTES" "${CHECKPOINT:--}"
	exit 0
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
	if s3_enabled && ! stopping; then
		s3_load
		if ! restore_checkpoint; then
			rc=1
			echo "asimov: checkpoint restore from S3 failed: $(tail -n 1 "$ROOT/sync/error")" >>"$ROOT/log"
		fi
	fi
	if [ "$rc" -eq 0 ] && [ -s "$ROOT/spec/setup.sh" ] && ! stopping; then
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
	# The final sync, by the agent itself (the controller may be away), before the
	# end-of-run hook that may tear the instance down.
	if s3_enabled; then
		sync_lock
		final_sync
		sync_unlock
	fi
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
	# When the state last changed: a dead supervisor's state stops changing.
	printf 'changed_at=%s\n' "$(date -r "$ROOT/status" +%s 2>/dev/null)"
	printf 'now=%s\n' "$(now)"
	printf '%s\n' "$MARKER"
	if [ -f "$ROOT/log" ]; then tail -c 4096 "$ROOT/log"; fi
	exit 0
}

[ $# -eq 2 ] || die "usage: agent.sh start|supervise|stop|status|sync-checkpoint|sync-final ROOT"
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
sync-checkpoint) cmd_sync checkpoint ;;
sync-final) cmd_sync final ;;
*) die "unknown command $1" ;;
esac
