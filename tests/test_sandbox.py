"""Hostile programs in opdgeom.sandbox: each is stopped or refused, scores 0, and leaves the test process and
its files unharmed. Each test would fail if its mechanism were removed. Nothing is skipped: without
bubblewrap every test fails with SandboxUnavailable (CI installs it with scripts/sandbox_deps.sh)."""

import os
import resource
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from opdgeom.sandbox import Limits, SandboxUnavailable, check_available, passes_tests, run_program

REPO = Path(__file__).resolve().parents[1]
FAST = Limits(cpu_s=2, wall_s=3)
SLACK_S = 1.5  # process start and kill, on a loaded 2-core machine


def stray_processes(marker: str) -> list[int]:
    """Pids whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # exited while we looked
            pass
    return pids


def test_available():
    assert "bubblewrap" in check_available()


def test_missing_bwrap_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_program("print('ran unsandboxed')")


def test_runs_a_program_with_stdin():
    outcome = run_program("import sys\nprint(sys.stdin.read().upper())", stdin="hello")
    assert (outcome.status, outcome.returncode, outcome.stdout) == ("ok", 0, "HELLO\n")
    assert outcome.passed


def test_cpu_loop_times_out():
    start = time.monotonic()
    outcome = run_program("while True: pass", limits=FAST)
    assert outcome.status == "timeout" and not outcome.passed
    assert time.monotonic() - start < FAST.wall_s + SLACK_S


def test_sleeping_program_hits_wall_time():
    start = time.monotonic()
    outcome = run_program("import time\ntime.sleep(100)", limits=FAST)
    assert (outcome.status, outcome.returncode) == ("timeout", None)
    assert time.monotonic() - start < FAST.wall_s + SLACK_S


def test_fork_bomb_is_stopped_and_we_can_still_fork():
    start = time.monotonic()
    outcome = run_program("import os\nwhile True: os.fork()", limits=FAST)
    assert not outcome.passed
    # RLIMIT_NPROC refuses the forks (the wall-time kill would say "timeout").
    assert outcome.status == "error" and "BlockingIOError" in outcome.stderr, outcome
    assert time.monotonic() - start < FAST.wall_s + SLACK_S
    assert subprocess.run(["true"]).returncode == 0
    assert os.waitpid(os.fork() or os._exit(0), 0)[1] == 0


def test_process_limit_counts_this_program():
    source = "import os\nfor i in range(40):\n    if os.fork() == 0:\n        import time; time.sleep(1); os._exit(0)"
    outcome = run_program(source, limits=Limits(processes=8))
    assert outcome.status == "error" and "BlockingIOError" in outcome.stderr, outcome


@pytest.mark.parametrize("ends", ["exits", "times out"])
def test_no_process_outlives_the_program(ends):
    marker = f"sandbox-stray-{secrets.token_hex(8)}"
    # A detached grandchild (new session, parent gone) that would sleep for a minute.
    source = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        f"{'pass' if ends == 'exits' else 'time.sleep(100)'}\n"
    )
    outcome = run_program(source, limits=FAST)
    assert outcome.status == ("ok" if ends == "exits" else "timeout"), outcome
    deadline = time.monotonic() + 2
    while stray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stray_processes(marker) == []


@pytest.mark.parametrize(
    "source",
    [
        "x = bytearray(10**10)",
        "x = bytearray(1 << 30)",  # twice the limit: would succeed without RLIMIT_AS
        "x = []\nwhile len(x) < 2048: x.append(bytearray(1 << 20))",
    ],
)
def test_memory_hog_is_refused(source):
    outcome = run_program(source, limits=Limits(memory_mb=512))
    assert outcome.status == "memory" and not outcome.passed, outcome


def test_no_network_outside():
    source = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')"
    outcome = run_program(source, limits=FAST)
    assert outcome.status == "error" and "connected" not in outcome.stdout
    assert "Network is unreachable" in outcome.stderr, outcome.stderr


def test_no_network_to_our_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0)
        port = server.getsockname()[1]
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        outcome = run_program(source, limits=FAST)
        assert outcome.status == "error" and "connected" not in outcome.stdout, outcome
        with pytest.raises(BlockingIOError):
            server.accept()


def test_environment_is_not_inherited(monkeypatch):
    secret = f"hf_{secrets.token_hex(16)}"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    outcome = run_program("import os, sys\nprint(dict(os.environ))\nprint(sys.path)")
    assert outcome.status == "ok", outcome
    assert secret not in outcome.stdout and "SLURM" not in outcome.stdout and str(REPO) not in outcome.stdout


def test_filesystem_outside_its_directory_is_out_of_reach(tmp_path):
    outside = [tmp_path / "escape.txt", REPO / f"escape-{secrets.token_hex(8)}.txt"]
    source = (
        "import pathlib\n"
        f"for path in {[str(p) for p in outside]!r}:\n"
        "    try:\n"
        "        pathlib.Path(path).write_text('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n"
        "try:\n"
        f"    print('READ', pathlib.Path({str(REPO / 'README.md')!r}).read_text()[:20])\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
        "pathlib.Path('mine.txt').write_text('ok')\n"  # its own directory and /tmp are writable
        "pathlib.Path('/tmp/mine.txt').write_text('ok')\n"
        "print('private ok')\n"
    )
    outcome = run_program(source)
    assert outcome.status == "ok", outcome
    assert "WROTE" not in outcome.stdout and "READ" not in outcome.stdout
    assert outcome.stdout.count("refused") == 3 and "private ok" in outcome.stdout
    assert not any(path.exists() for path in outside)
    assert not (REPO / "mine.txt").exists()


def test_file_size_is_capped():
    outcome = run_program("open('big', 'wb').write(b'x' * (1 << 25))", limits=Limits(file_bytes=1 << 20))
    assert outcome.status == "error" and "File too large" in outcome.stderr, outcome


@pytest.mark.parametrize("where", [".", "/tmp"])
def test_many_files_fill_only_a_small_tmpfs(where):
    source = f"for i in range(100):\n    open(f'{where}/f{{i}}', 'wb').write(b'x' * (1 << 20))"
    outcome = run_program(source, limits=Limits(file_bytes=1 << 20))
    assert outcome.status == "error" and "No space left on device" in outcome.stderr, outcome


def test_printing_gigabytes_hits_the_output_cap():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    outcome = run_program('while True: print("x" * 10**6)')
    assert (outcome.status, outcome.returncode) == ("output", None)
    assert time.monotonic() - start < 3
    assert len(outcome.stdout) <= Limits().output_bytes + 1
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024


PROBLEMS = [
    (
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b",
        "assert add(1, 2) == 3\nassert add(-1, 1) == 0",
    ),
    (
        "def is_palindrome(s):\n    return s == s[::-1]",
        "def is_palindrome(s):\n    return s[0] == s[-1]",
        "assert is_palindrome('racecar')\nassert not is_palindrome('abca')",
    ),
    (
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        "def fib(n):\n    return n",
        "assert [fib(i) for i in range(7)] == [0, 1, 1, 2, 3, 5, 8]",
    ),
]


@pytest.mark.parametrize("correct, wrong, tests", PROBLEMS)
def test_unit_test_reward(correct, wrong, tests):
    assert passes_tests(correct, tests)
    assert not passes_tests(wrong, tests)


@pytest.mark.parametrize(
    "hack",
    ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "while True: pass"],
)
def test_skipping_the_tests_does_not_pass(hack):
    assert not passes_tests(f"def add(a, b):\n    return 0\n{hack}", "assert add(1, 2) == 3", limits=FAST)
