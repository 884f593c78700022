#!/usr/bin/env bash
# asimov beside SkyPilot and dstack (issue 12): the closest equivalent commands of the
# three tools, timed on this machine in one run. Prints figures and ratios; asserts
# nothing about speed. Too heavy for CI (it installs both tools from PyPI): run by hand.
#
#   scripts/bench-compare.sh [-n RUNS (10)] [-w WARMUP (2)] [-r SEEDED_RUNS (1000)]
#   ASIMOV_BIN=target/release/asimov scripts/bench-compare.sh -n 10
#
# Installs: SkyPilot and dstack (dstack[server], for its local server) from PyPI, each
# in its own venv under ${XDG_CACHE_HOME:-~/.cache}/asimov/ (skypilot-venv, dstack-venv),
# at the versions pinned below. A venv whose stamp matches is reused as it is. Override
# the versions with BENCH_COMPARE_SKYPILOT / BENCH_COMPARE_DSTACK (pip specifiers).
# Measured here: 460 MB and 268 MB, 268 s and 147 s to install under load; the timed
# part then takes about 10 minutes at -n 10 (each Python command takes seconds).
#
# Measures, each as the median (nearest rank) of RUNS wall-clock runs after WARMUP
# discarded ones, spawn to exit, output captured to a file:
#   asimov --help, asimov get runs (empty store; SEEDED_RUNS runs seeded by
#   `asimov bench --seed-only`, the same runs as `asimov bench`; empty store with an
#   `asimov controller` running on it);
#   sky --help, sky status (no cloud credentials);
#   dstack --help, dstack ps without a server, then dstack ps against a `dstack server`
#   started from the same install on a free loopback port, stopped afterwards.
# The other tools run with a clean environment (PATH, LANG and a temp HOME only), so
# they see no credentials and write nothing into the real ~/.sky or ~/.dstack. The
# asimov controller's cloud API URLs point at a closed loopback port, so nothing it
# does can leave the machine. Everything it started is stopped and the temp dir removed
# on exit, also on failure.

set -euo pipefail

usage() {
	echo "usage: $0 [-n RUNS (10)] [-w WARMUP (2)] [-r SEEDED_RUNS (1000)]   (ASIMOV_BIN: the binary)" >&2
	exit 2
}

RUNS=10
WARMUP=2
SEEDED=1000
while getopts "n:w:r:h" opt; do
	case $opt in
	n) RUNS=$OPTARG ;;
	w) WARMUP=$OPTARG ;;
	r) SEEDED=$OPTARG ;;
	*) usage ;;
	esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || usage
[[ $WARMUP =~ ^[0-9]+$ ]] || usage
[[ $SEEDED =~ ^[1-9][0-9]*$ ]] || usage

BIN=${ASIMOV_BIN:-target/release/asimov}
[ -x "$BIN" ] || {
	echo "bench-compare: no asimov binary at $BIN (build it: cargo build --release, or set ASIMOV_BIN)" >&2
	exit 1
}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
command -v python3 >/dev/null || {
	echo "bench-compare: python3 (3.10 or newer, with venv) is needed" >&2
	exit 1
}
# The interpreter itself, not a version manager's shim: it also runs under `env -i`.
PY=$(python3 -c 'import sys; print(sys.executable)')

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/asimov
SKY_VENV=$CACHE/skypilot-venv
DSTACK_VENV=$CACHE/dstack-venv
# The versions these figures were taken with; a newer release may behave differently.
SKY_SPEC=${BENCH_COMPARE_SKYPILOT:-skypilot==0.14.1}
DSTACK_SPEC=${BENCH_COMPARE_DSTACK:-dstack[server]==0.22.5}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/asimov-bench-compare.XXXXXX")
TOOL_HOME=$TMP/home
RESULTS=$TMP/results.tsv
mkdir -p "$TOOL_HOME" "$TMP/manifests"
: >"$RESULTS"
CONTROLLER_PID=
DSTACK_PID=

# Pids of every process whose environment holds exactly $1 (KEY=value): the SkyPilot API
# server and the dstack server detach from the command that started them, and all of
# them got HOME=$TOOL_HOME.
pids_with_env() {
	local entry=$1 p
	for p in /proc/[0-9]*; do
		if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "$entry"; then
			echo "${p#/proc/}"
		fi
	done
}

stop_pid() {
	local pid=$1
	kill -TERM "$pid" 2>/dev/null || return 0
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
	local pid
	[ -n "$CONTROLLER_PID" ] && stop_pid "$CONTROLLER_PID"
	[ -n "$DSTACK_PID" ] && stop_pid "$DSTACK_PID"
	if [ -x "$SKY_VENV/bin/sky" ]; then
		tool "$SKY_VENV" sky api stop >/dev/null 2>&1 || true
	fi
	for pid in $(pids_with_env "HOME=$TOOL_HOME"); do
		[ "$pid" != $$ ] && stop_pid "$pid"
	done
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a tool of the venv $1 with a clean environment: no credentials, a temp HOME.
# SkyPilot's usage reports are turned off and the GPU catalog that dstack's server
# downloads points at a closed loopback port: neither host can be reached from here,
# and the benchmark must send nothing off the machine.
tool() {
	local venv=$1
	shift
	env -i PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" HOME="$TOOL_HOME" LANG=C.UTF-8 \
		TMPDIR="${TMPDIR:-/tmp}" SKYPILOT_DISABLE_USAGE_COLLECTION=1 \
		GPUHUNT_CATALOG_URL=http://127.0.0.1:9 "$@"
}

# install_venv VENV SPEC MODULE: makes VENV hold SPEC (a pip specifier), unless its stamp
# says it already does. Prints what it did; returns non-zero (after printing pip's last
# lines) when the install fails, so the figures of that tool are reported as missing.
install_venv() {
	local venv=$1 spec=$2 module=$3 want started log
	want=$({ python3 --version 2>&1; echo "$spec"; } | sha256sum | cut -d' ' -f1)
	if [ -f "$venv/.asimov-stamp" ] && [ "$(cat "$venv/.asimov-stamp")" = "$want" ] \
		&& [ -x "$venv/bin/python" ]; then
		echo "bench-compare: $venv holds $spec ($(du -sh "$venv" | cut -f1)), reused"
		return 0
	fi
	echo "bench-compare: installing $spec into $venv"
	started=$(date +%s)
	log=$TMP/pip-$(basename "$venv").log
	rm -rf "$venv"
	mkdir -p "$(dirname "$venv")"
	# --no-cache-dir: each wheel is installed once; a pip cache would double the disk.
	if ! { python3 -m venv "$venv" \
		&& "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
			-q "$spec" \
		&& "$venv/bin/python" -c "import $module"; } >"$log" 2>&1; then
		echo "bench-compare: installing $spec FAILED; pip's last lines:" >&2
		tail -n 20 "$log" >&2
		return 1
	fi
	# The stamp comes last, so an interrupted install never looks done.
	echo "$want" >"$venv/.asimov-stamp"
	echo "bench-compare: installed $spec in $(($(date +%s) - started)) s ($(du -sh "$venv" | cut -f1))"
}

version_of() { "$1/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))"; }

# The timer: runs a command WARMUP + RUNS times, appends one line to $RESULTS:
# key, label, first run's ms, median, min, max, median CPU ms, exit code of the last run,
# and the first
# line it printed (stdout then stderr), and keeps its whole output in $TMP/out-KEY.txt.
cat >"$TMP/timer.py" <<'EOF'
import os, subprocess, sys, time

key, label, runs, warmup, results, out_dir = sys.argv[1:7]
cmd = sys.argv[7:]
runs, warmup = int(runs), int(warmup)
samples, cpus, rc = [], [], None
out_path = f"{out_dir}/out-{key}.txt"
for i in range(warmup + runs):
    with open(out_path, "wb") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        # wait4 gives the child's own CPU time (user + sys, with its waited-for children),
        # which a loaded machine inflates far less than the wall time.
        _, status, usage = os.wait4(child.pid, 0)
        samples.append((time.perf_counter() - t0) * 1000)
        child.returncode = rc = os.waitstatus_to_exitcode(status)
        cpus.append((usage.ru_utime + usage.ru_stime) * 1000)
first = samples[0]
measured = sorted(samples[warmup:])
nearest = lambda v: v[(len(v) + 1) // 2 - 1]  # nearest-rank median: a measured value
median = nearest(measured)
cpu = nearest(sorted(cpus[warmup:]))
with open(out_path, "rb") as f:
    text = f.read().decode("utf-8", "replace")
line = next((l.strip() for l in text.splitlines() if l.strip()), "(nothing)")
line = line.replace("\t", " ")[:100]
with open(results, "a") as f:
    f.write("\t".join([key, label, f"{first:.1f}", f"{median:.1f}", f"{measured[0]:.1f}",
                       f"{measured[-1]:.1f}", f"{cpu:.1f}", str(rc), line]) + "\n")
print(f"  {label}: median {median:.1f} ms, CPU {cpu:.1f} ms (exit {rc}; first run {first:.1f} ms)")
EOF
# measure_asimov KEY LABEL HOME ARGS...: times the asimov binary with ASIMOV_HOME=HOME.
measure_asimov() {
	local key=$1 label=$2 home=$3
	shift 3
	ASIMOV_HOME=$home "$PY" "$TMP/timer.py" "$key" "$label" "$RUNS" "$WARMUP" "$RESULTS" \
		"$TMP" "$BIN" "$@"
}
# measure_tool KEY LABEL VENV COMMAND ARGS...: times the venv's COMMAND, clean environment.
measure_tool() {
	local key=$1 label=$2 venv=$3 command=$4
	shift 4
	tool "$venv" "$PY" "$TMP/timer.py" "$key" "$label" "$RUNS" "$WARMUP" "$RESULTS" "$TMP" \
		"$venv/bin/$command" "$@"
}

# A free loopback TCP port (bound then released; the tiny race is acceptable here).
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to $2 seconds for an HTTP answer (any status) on 127.0.0.1:$1.
wait_http() {
	"$PY" - "$1" "$2" <<'EOF'
import sys, time, urllib.request, urllib.error
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(1)
EOF
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')

SKY_OK=0
DSTACK_OK=0
install_venv "$SKY_VENV" "$SKY_SPEC" sky && SKY_OK=1
install_venv "$DSTACK_VENV" "$DSTACK_SPEC" dstack && DSTACK_OK=1
DISK=$({ du -sch "$SKY_VENV" "$DSTACK_VENV" 2>/dev/null || true; } | tail -n1 | cut -f1)

echo "bench-compare: asimov"
ASIMOV_VERSION=$("$BIN" --version 2>&1 | head -n1)
export ASIMOV_LAMBDA_API_URL=http://127.0.0.1:9 ASIMOV_RUNPOD_API_URL=http://127.0.0.1:9 \
	ASIMOV_VAST_API_URL=http://127.0.0.1:9
unset ASIMOV_LOG
EMPTY=$TMP/asimov-empty
SEEDED_HOME=$TMP/asimov-seeded
measure_asimov asimov-help "asimov --help" "$EMPTY" --help
measure_asimov asimov-get-empty "asimov get runs (empty store)" "$EMPTY" get runs
ASIMOV_HOME=$SEEDED_HOME "$BIN" bench --seed-only --runs "$SEEDED" >/dev/null
measure_asimov asimov-get-seeded "asimov get runs ($SEEDED runs)" "$SEEDED_HOME" get runs
# The controller holds the store open and runs its start-up pass; get runs reads the
# same SQLite file beside it, as a user does while the daemon works.
ASIMOV_HOME=$EMPTY "$BIN" controller --manifests "$TMP/manifests" >"$TMP/controller.log" 2>&1 &
CONTROLLER_PID=$!
sleep 2
if kill -0 "$CONTROLLER_PID" 2>/dev/null; then
	measure_asimov asimov-get-controller "asimov get runs (empty, controller running)" \
		"$EMPTY" get runs
else
	echo "bench-compare: the controller exited at once:" >&2
	cat "$TMP/controller.log" >&2
fi
stop_pid "$CONTROLLER_PID"
CONTROLLER_PID=

SKY_VERSION="not installed"
if [ "$SKY_OK" = 1 ]; then
	echo "bench-compare: SkyPilot"
	SKY_VERSION=$(version_of "$SKY_VENV" skypilot)
	measure_tool sky-help "sky --help" "$SKY_VENV" sky --help
	# The first `sky status` in a new HOME starts SkyPilot's local API server (the
	# first run's time shows it); the measured runs talk to that server over HTTP.
	measure_tool sky-status "sky status" "$SKY_VENV" sky status
	tool "$SKY_VENV" sky api stop >/dev/null 2>&1 || true
fi

DSTACK_VERSION="not installed"
if [ "$DSTACK_OK" = 1 ]; then
	echo "bench-compare: dstack"
	DSTACK_VERSION=$(version_of "$DSTACK_VENV" dstack)
	measure_tool dstack-help "dstack --help" "$DSTACK_VENV" dstack --help
	measure_tool dstack-ps-none "dstack ps (no server)" "$DSTACK_VENV" dstack ps
	PORT=$(free_port)
	# The server prints its admin token: its log stays in the 0700 temp dir, never shown.
	tool "$DSTACK_VENV" "$DSTACK_VENV/bin/dstack" server --host 127.0.0.1 --port "$PORT" \
		>"$TMP/dstack-server.log" 2>&1 &
	DSTACK_PID=$!
	if wait_http "$PORT" 180; then
		measure_tool dstack-ps-server "dstack ps (local server)" "$DSTACK_VENV" dstack ps
	else
		echo "bench-compare: dstack server did not answer on 127.0.0.1:$PORT in 180 s; its log without token lines:" >&2
		grep -vi token "$TMP/dstack-server.log" | tail -n 20 >&2 || true
	fi
	stop_pid "$DSTACK_PID"
	DSTACK_PID=
fi

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# The table: each figure and its ratio to asimov's closest equivalent.
"$PY" - "$RESULTS" "$STARTED" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" "$ASIMOV_VERSION" \
	"$SKY_VERSION" "$DSTACK_VERSION" "$DISK" "$RUNS" "$WARMUP" <<'EOF'
import sys
started, cores, load_before, load_after, v_asimov, v_sky, v_dstack, disk, runs, warmup = \
    sys.argv[2:]
rows = {}
order = []
for line in open(sys.argv[1]):
    key, label, first, median, lo, hi, cpu, rc, out = line.rstrip("\n").split("\t")
    rows[key] = dict(label=label, first=float(first), median=float(median), lo=float(lo),
                     hi=float(hi), cpu=float(cpu), rc=rc, out=out)
    order.append(key)
# Which asimov figure each figure is compared with.
pair = {
    "asimov-get-seeded": "asimov-get-empty",
    "asimov-get-controller": "asimov-get-empty",
    "sky-help": "asimov-help",
    "dstack-help": "asimov-help",
    "sky-status": "asimov-get-empty",
    "dstack-ps-none": "asimov-get-empty",
    "dstack-ps-server": "asimov-get-controller",
}
print()
print(f"asimov beside SkyPilot and dstack: {started}, {cores} cores, load average"
      f" {load_before} before, {load_after} after")
print(f"versions: {v_asimov}; skypilot {v_sky}; dstack {v_dstack}; venvs {disk} on disk")
print(f"wall clock spawn to exit, and the process's own CPU time (user + sys, wait4), medians"
      f" of {runs} runs after {warmup} warm-up ones (nearest rank); a server's CPU is not in it")
print()
print("| command | median wall | min – max | first run | CPU (median) | exit | wall ratio | CPU ratio"
      " | compared with |")
print("|---|---|---|---|---|---|---|---|---|")
for key in order:
    r = rows[key]
    base = rows.get(pair.get(key, ""))
    ratio = f"{r['median'] / base['median']:.1f}×" if base else ""
    cpu_ratio = f"{r['cpu'] / base['cpu']:.1f}×" if base and base["cpu"] > 0 else ""
    against = f"`{base['label']}`" if base else ""
    print(f"| `{r['label']}` | {r['median']:.1f} ms | {r['lo']:.1f} – {r['hi']:.1f} ms"
          f" | {r['first']:.1f} ms | {r['cpu']:.1f} ms | {r['rc']} | {ratio} | {cpu_ratio}"
          f" | {against} |")
print()
print("first line each printed (last run):")
for key in order:
    print(f"  {rows[key]['label']}: {rows[key]['out']}")
EOF
if [ "$SKY_OK" != 1 ] || [ "$DSTACK_OK" != 1 ]; then
	echo "bench-compare: some figures could not be taken (an install failed; see above)" >&2
	exit 1
fi
