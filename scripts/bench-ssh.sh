#!/usr/bin/env bash
# The time asimov adds on top of a job's own setup and run, for a job on a localhost
# SSH host (issue 3). Prints figures; asserts nothing about speed.
#
#   scripts/bench-ssh.sh [-n ITERATIONS] [-s RUN_SECONDS]
#   ASIMOV_BIN=target/release/asimov scripts/bench-ssh.sh -n 5
#
# It starts a real OpenSSH server on a free localhost port (fresh host and client keys
# in a temp dir), a temp $ASIMOV_HOME, a temp git repo as the job's workdir, and a
# Fleet of that one host. Each iteration applies a fresh job (bench-1, bench-2, ...)
# whose setup and run stamp the time (`date +%s.%N`) into its output folder:
#
#   setup: mkdir -p out && date +%s.%N > out/t_setup
#   run:   date +%s.%N > out/t_run; sleep RUN_SECONDS; echo x > out/r.txt;
#          date +%s.%N > out/t_end
#
# The sshd runs on this machine, so those stamps and ours share one clock. A python3
# helper times `apply`, polls `asimov get runs NAME -o json` every 20 ms for the phase,
# and polls every 5 ms for the outputs in $ASIMOV_HOME/artifacts/NAME-0/out/. Between
# iterations it waits until the host's instance folder is gone (the slot is free).
# Everything it started is stopped and every temp dir removed on exit, also on failure.
# To see what the controller did, run with ASIMOV_LOG=debug and
# BENCH_SSH_CONTROLLER_LOG=FILE: the controller's log is copied there before clean-up;
# BENCH_SSH_SSHD_LOG=FILE does the same for the sshd's log, each line with its time.

set -euo pipefail

usage() {
	echo "usage: $0 [-n ITERATIONS (5)] [-s RUN_SECONDS (1)]   (ASIMOV_BIN: the binary)" >&2
	exit 2
}

ITERATIONS=5
RUN_SECONDS=1
while getopts "n:s:h" opt; do
	case $opt in
	n) ITERATIONS=$OPTARG ;;
	s) RUN_SECONDS=$OPTARG ;;
	*) usage ;;
	esac
done
[[ $ITERATIONS =~ ^[1-9][0-9]*$ ]] || usage
[[ $RUN_SECONDS =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage

BIN=${ASIMOV_BIN:-target/release/asimov}
[ -x "$BIN" ] || {
	echo "bench-ssh: no asimov binary at $BIN (build it: cargo build --release, or set ASIMOV_BIN)" >&2
	exit 1
}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
SSHD=/usr/sbin/sshd
for tool in "$SSHD" ssh-keygen python3 git; do
	command -v "$tool" >/dev/null || {
		echo "bench-ssh: $tool is missing (scripts/install-test-deps.sh installs the ssh tools)" >&2
		exit 1
	}
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/asimov-bench-ssh.XXXXXX")
SSHD_DIR=$TMP/sshd
export ASIMOV_HOME=$TMP/asimov-home
REPO=$TMP/repo
SSHD_PID=
STAMP_PID=

# Pids of every process whose environment holds exactly $1 (KEY=value). The sshd's
# sessions give HOME=$SSHD_DIR/home to what they start (tmux, the agent, the job),
# which detach from sshd, so this is how they are found and stopped.
pids_with_env() {
	local entry=$1 p
	for p in /proc/[0-9]*; do
		if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "$entry"; then
			echo "${p#/proc/}"
		fi
	done
}

# Every process below $1 in the process tree. sshd forks one process per connection;
# killing the listener alone leaves those (and the client's master connection) alive.
descendants() {
	ps -eo pid=,ppid= | awk -v root="$1" '
		{ parent[$1] = $2 }
		END {
			found[root] = 1; grew = 1
			while (grew) {
				grew = 0
				for (p in parent) if (!(p in found) && (parent[p] in found)) { found[p] = 1; grew = 1 }
			}
			for (p in found) if (p != root) print p
		}'
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -f "$ASIMOV_HOME/controller.pid" ]; then
		# Delete the jobs while the controller runs, so nothing is left on the host.
		local job
		for job in $("$BIN" get jobs -o json 2>/dev/null |
			python3 -c 'import json,sys; print(" ".join(j["name"] for j in json.load(sys.stdin)["items"]))' 2>/dev/null); do
			timeout 60 "$BIN" delete job "$job" >/dev/null 2>&1 || echo "bench-ssh: could not delete job $job" >&2
		done
		local cpid
		cpid=$(cat "$ASIMOV_HOME/controller.pid" 2>/dev/null || true)
		if [ -n "$cpid" ] && kill "$cpid" 2>/dev/null; then
			for _ in $(seq 100); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.05; done
			kill -9 "$cpid" 2>/dev/null || true
		fi
	fi
	local p
	# What asimov started and left running (e.g. its ssh master connections) carries
	# our ASIMOV_HOME in its environment.
	for p in $(pids_with_env "ASIMOV_HOME=$ASIMOV_HOME"); do
		[ "$p" = $$ ] || [ "$p" = "$BASHPID" ] || kill "$p" 2>/dev/null || true
	done
	if [ -n "$SSHD_PID" ]; then
		for p in $(descendants "$SSHD_PID"); do kill -9 "$p" 2>/dev/null || true; done
		kill "$SSHD_PID" 2>/dev/null || true
		wait "$SSHD_PID" 2>/dev/null || true
	fi
	if [ -n "$STAMP_PID" ]; then
		kill "$STAMP_PID" 2>/dev/null || true
		wait "$STAMP_PID" 2>/dev/null || true
	fi
	if [ -n "${BENCH_SSH_CONTROLLER_LOG:-}" ] && [ -f "$ASIMOV_HOME/controller.log" ]; then
		cp "$ASIMOV_HOME/controller.log" "$BENCH_SSH_CONTROLLER_LOG" || true
	fi
	if [ -n "${BENCH_SSH_SSHD_LOG:-}" ] && [ -f "$SSHD_DIR/sshd.log" ]; then
		cp "$SSHD_DIR/sshd.log" "$BENCH_SSH_SSHD_LOG" || true
	fi
	for p in $(pids_with_env "HOME=$SSHD_DIR/home"); do kill -9 "$p" 2>/dev/null || true; done
	rm -rf "$TMP"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the "remote" host: a real sshd on a free localhost port ---------------------------
mkdir -p "$SSHD_DIR/home" "$SSHD_DIR/tmux" "$ASIMOV_HOME" "$REPO"
ssh-keygen -q -t ed25519 -N "" -C asimov-bench -f "$SSHD_DIR/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N "" -C asimov-bench -f "$SSHD_DIR/client_key"
cp "$SSHD_DIR/client_key.pub" "$SSHD_DIR/authorized_keys"
[ "$(id -u)" -ne 0 ] || mkdir -p /run/sshd
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$SSHD_DIR/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $SSHD_DIR/ssh_host_ed25519_key
PidFile $SSHD_DIR/sshd.pid
AuthorizedKeysFile $SSHD_DIR/authorized_keys
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
LogLevel VERBOSE
Subsystem sftp internal-sftp
SetEnv HOME=$SSHD_DIR/home TMUX_TMPDIR=$SSHD_DIR/tmux
EOF
# Each sshd log line gets the time it was written: with LogLevel VERBOSE, sshd logs
# every session asimov opens ("Starting session: command ..."), which shows where the
# time goes (BENCH_SSH_SSHD_LOG=FILE keeps the log).
stamp_lines() {
	local line
	while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done
}
mkfifo "$SSHD_DIR/log.fifo"
stamp_lines <"$SSHD_DIR/log.fifo" >>"$SSHD_DIR/sshd.log" 2>/dev/null &
STAMP_PID=$!
"$SSHD" -D -e -f "$SSHD_DIR/sshd_config" </dev/null >/dev/null 2>"$SSHD_DIR/log.fifo" &
SSHD_PID=$!
python3 - "$PORT" <<'EOF' || { cat "$SSHD_DIR/sshd.log" >&2; exit 1; }
import socket, sys, time
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
            if s.recv(4) == b"SSH-":
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.02)
sys.exit("bench-ssh: sshd did not come up")
EOF

# --- the job's workdir: a git repo -------------------------------------------------------
(
	cd "$REPO"
	git init -q -b main
	echo "echo training" >train.sh
	git add .
	GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@example.com \
		GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@example.com \
		git commit -q -m "bench"
)
cat >"$REPO/fleet.yaml" <<EOF
apiVersion: asimov/v1
kind: Fleet
metadata: {name: lab}
spec:
  hosts:
    - {name: box-1, user: $(id -un), address: 127.0.0.1, port: $PORT, identity_file: $SSHD_DIR/client_key, gpus: 0}
EOF

cd "$REPO"
python3 - "$BIN" "$ITERATIONS" "$RUN_SECONDS" "$SSHD_DIR/home" <<'EOF'
import json, os, statistics, subprocess, sys, threading, time

BIN, N, RUN_SECONDS, REMOTE_HOME = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
HOME = os.environ["ASIMOV_HOME"]
INSTANCES = os.path.join(REMOTE_HOME, ".asimov-agent", "instances")
TIMEOUT = 120.0
# Seconds between two `get runs` polls (BENCH_SSH_POLL_SECONDS, to check that the
# polling does not change what it measures).
POLL = float(os.environ.get("BENCH_SSH_POLL_SECONDS", "0.02"))


def asimov(*args, check=True):
    out = subprocess.run([BIN, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"bench-ssh: asimov {' '.join(args)} failed: {out.stderr.strip()}")
    return out


def wait_until(what, pred, timeout=TIMEOUT, every=0.02):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            sys.exit(f"bench-ssh: timed out waiting for {what}")
        time.sleep(every)


def host_free():
    try:
        return not os.listdir(INSTANCES)
    except FileNotFoundError:
        return True


# The fleet first, on its own: this apply starts the background controller.
asimov("apply", "-f", "fleet.yaml")

OUT_FILES = ("r.txt", "t_setup", "t_run", "t_end")
rows = []
for i in range(1, N + 1):
    job, run = f"bench-{i}", f"bench-{i}-0"
    with open(f"{job}.yaml", "w") as f:
        f.write(
            "apiVersion: asimov/v1\nkind: Job\n"
            f"metadata: {{name: {job}}}\n"
            "spec:\n"
            "  source: {workdir: .}\n"
            "  setup: ['mkdir -p out && date +%s.%N > out/t_setup']\n"
            f"  run: 'date +%s.%N > out/t_run; sleep {RUN_SECONDS}; echo x > out/r.txt; date +%s.%N > out/t_end'\n"
            "  artifacts: {paths: [out]}\n"
            "  placement: [{provider: ssh, fleet: lab}]\n"
        )
    out_dir = os.path.join(HOME, "artifacts", run, "out")
    seen = {}  # phase -> first time `get runs` showed it
    local = {}

    def watch_outputs():
        # Every output present locally; t_end is the job's last write.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if all(os.path.exists(os.path.join(out_dir, f)) for f in OUT_FILES):
                local["t"] = time.time()
                return
            time.sleep(0.005)

    t_apply = time.time()
    watcher = threading.Thread(target=watch_outputs, daemon=True)
    watcher.start()
    asimov("apply", "-f", f"{job}.yaml")
    t_applied = time.time()
    deadline = time.monotonic() + TIMEOUT
    phase = None
    while phase not in ("Succeeded", "Failed"):
        if time.monotonic() > deadline:
            sys.exit(f"bench-ssh: {run} did not finish; last phase {phase}")
        out = asimov("get", "runs", run, "-o", "json", check=False)
        now = time.time()
        # Until the controller has recorded the run, `get runs` says there is none.
        items = []
        if out.returncode == 0:
            items = [r for r in json.loads(out.stdout)["items"] if r["name"] == run]
        elif "no run or job named" not in out.stderr:
            sys.exit(f"bench-ssh: asimov get runs {run} failed: {out.stderr.strip()}")
        if items:
            phase = items[0]["phase"]
            seen.setdefault(phase, now)
        time.sleep(POLL)
    if phase != "Succeeded":
        sys.exit(f"bench-ssh: {run} {phase}: {items[0].get('reason')}")
    watcher.join()
    if "t" not in local:
        sys.exit(f"bench-ssh: the outputs of {run} never arrived in {out_dir}")

    def stamp(name):
        with open(os.path.join(out_dir, name)) as f:
            return float(f.read().strip())

    t_setup, t_end = stamp("t_setup"), stamp("t_end")
    rows.append({
        "apply_cmd": t_applied - t_apply,
        "to_setup": t_setup - t_apply,
        "to_running": seen["Running"] - t_apply if "Running" in seen else None,
        "job": t_end - t_setup,
        "back": local["t"] - t_end,
        "to_succeeded": seen["Succeeded"] - t_apply,
        "total": local["t"] - t_apply,
        "overhead": (local["t"] - t_apply) - (t_end - t_setup),
        "phases": " ".join(p for p, _ in sorted(seen.items(), key=lambda kv: kv[1])),
    })
    # The next job must find the host free, not queue behind this one's teardown.
    wait_until("the host to be free", host_free)

FIGURES = [
    ("apply_cmd", "`asimov apply` command returns"),
    ("to_setup", "apply -> job's setup starts (remote stamp)"),
    ("to_running", "apply -> `get runs` shows Running"),
    ("job", "job's own setup + run (remote stamps)"),
    ("back", "job ends -> outputs present locally"),
    ("to_succeeded", "apply -> `get runs` shows Succeeded"),
    ("total", "apply -> outputs present locally"),
    ("overhead", "asimov's overhead (total - job)"),
]


def ms(v):
    return "—" if v is None else f"{v * 1000:.0f}"


print(f"asimov SSH host overhead: {N} iterations, job runs `sleep {RUN_SECONDS}`, "
      f"one localhost sshd, binary {BIN}")
print()
print("per iteration (ms):")
head = ["iter"] + [k for k, _ in FIGURES] + ["phases seen"]
print("  " + "  ".join(f"{h:>12}" if h != "phases seen" else h for h in head))
for i, r in enumerate(rows, 1):
    cells = [f"{i:>12}"] + [f"{ms(r[k]):>12}" for k, _ in FIGURES] + [r["phases"]]
    print("  " + "  ".join(cells))
print()
print("| Figure | min / median / max (ms) | samples |")
print("|---|---|---|")
for key, label in FIGURES:
    vals = [r[key] for r in rows if r[key] is not None]
    if not vals:
        print(f"| {label} | not seen | 0 of {N} |")
        continue
    print(f"| {label} | {ms(min(vals))} / {ms(statistics.median(vals))} / {ms(max(vals))} "
          f"| {len(vals)} of {N} |")
EOF
