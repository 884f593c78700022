#!/usr/bin/env python3
"""How soon `asimov` alone shows its first question, through a real pseudo-terminal.

    cargo build --release && scripts/bench-prompt.py target/release/asimov [RUNS]

For each run: a fresh temp $ASIMOV_HOME, `asimov` started on a new pty (pty.fork, then
exec), the clock read just before the fork and again when the question's text has been
read from the pty master; then Ctrl-C, and the exit code must be 130 (left cleanly).
Two cases: a first start (the question is the Hugging Face token) and a later start
(token stored: the question is the model). Prints min / median / p95 (nearest rank) in
milliseconds. HF_ENDPOINT points at a closed port so nothing reaches the network.
"""

import os
import pty
import select
import shutil
import socket
import sys
import tempfile
import time


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def one(binary, home, needle, env):
    start = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env)
        os.environ["ASIMOV_HOME"] = home
        os.execv(binary, [binary])
    seen = b""
    elapsed = None
    deadline = start + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if needle in seen:
                elapsed = time.monotonic() - start
                break
    os.write(fd, b"\x03")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    code = os.waitstatus_to_exitcode(status)
    if elapsed is None or code != 130:
        sys.exit(f"no {needle!r} (exit code {code}); saw {seen[-400:]!r}")
    return elapsed * 1000


def stats(samples):
    s = sorted(samples)
    rank = lambda p: s[max(0, -(-len(s) * p // 100) - 1)]
    return f"min {s[0]:.1f} ms, median {rank(50):.1f} ms, p95 {rank(95):.1f} ms ({len(s)} runs)"


def main():
    binary = os.path.abspath(sys.argv[1])
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "TERM": "xterm"}
    for label, needle, with_token in [
        ("first start (token question)", b"Hugging Face token", False),
        ("later start (model question)", b"Model to fine-tune", True),
    ]:
        samples = []
        for i in range(runs + 3):
            home = tempfile.mkdtemp(prefix="asimov-bench-prompt-")
            try:
                if with_token:
                    os.makedirs(os.path.join(home, "credentials"), mode=0o700)
                    path = os.path.join(home, "credentials", "HF_TOKEN")
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                    os.write(fd, b"hf_" + b"a" * 34)
                    os.close(fd)
                ms = one(binary, home, needle, env)
                if i >= 3:  # three warm-up runs are thrown away
                    samples.append(ms)
            finally:
                shutil.rmtree(home, ignore_errors=True)
        print(f"{label}: {stats(samples)}")


if __name__ == "__main__":
    main()
