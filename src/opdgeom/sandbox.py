"""Run model-written Python programs (hostile input) for the code domain's "all unit tests pass" reward.

Threat model: the program is arbitrary code written to maximise reward. It may loop, fork-bomb, allocate
or print without bound, fill the disk, read secrets (HF tokens, Slurm variables, the checkout, results),
reach the network, or try to fake a pass. It must not harm the job, the machine or other programs, and
everything but a real pass scores 0. Mechanisms, one per threat:

- bubblewrap (``bwrap``) namespaces: ``--unshare-all`` (user, pid, net, ipc, uts, cgroup), so no network
  (only an unconfigured loopback) and its own pid 1; ``--clearenv`` (nothing of the job's environment);
  a new root holding only read-only ``/usr`` (plus the interpreter's prefix if it lives elsewhere) and
  minimal ``/proc`` and ``/dev`` -- the checkout, results and home directories are not visible at all;
  the only writable places are two size-capped tmpfs, ``/tmp`` and the cwd ``/sandbox``, gone afterwards.
  ``--cap-drop ALL``, ``--disable-userns``, ``--new-session`` (no TIOCSTI into our terminal),
  ``--die-with-parent``. As root, bwrap itself runs as ``nobody``: the sandbox uid then maps to an
  unprivileged uid (an escape lands on nobody, and the kernel exempts uid 0 from RLIMIT_NPROC).
- rlimits set by ``prlimit`` inside the namespaces, right before the interpreter: CPU, address space,
  processes (counted per user namespace, so per program), file size, open files, no core dumps.
- wall time and output: we read stdout+stderr with a byte cap and a deadline; past either the whole
  sandbox is killed (SIGKILL to bwrap; pid 1 of the namespace dies with it, which kills every process in
  it), so a program that prints gigabytes costs at most ``output_bytes`` of our memory.
- no fallback: if bwrap or namespaces are missing, ``SandboxUnavailable`` says what to install or enable.

``passes_tests`` also requires a per-call random token printed after the tests, so a solution that
``sys.exit(0)``s before the asserts run does not pass (one that reads its own source for the token, or
returns objects equal to everything, still can: no sandbox stops cheating inside the program).
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Limits", "Outcome", "SandboxUnavailable", "check_available", "passes_tests", "run_program"]

INSTALL_HINT = "install it with scripts/sandbox_deps.sh (apt-get install bubblewrap)"
USERNS_HINT = (
    "the kernel refused user namespaces: enable them (sysctl kernel.unprivileged_userns_clone=1, "
    "user.max_user_namespaces>0; on Ubuntu 24.04 kernel.apparmor_restrict_unprivileged_userns=0) "
    "or run in a container that allows them"
)
NOBODY = 65534  # uid/gid of nobody/nogroup on Debian and most distributions


class SandboxUnavailable(RuntimeError):
    """No real sandbox can be set up here; nothing is ever run unsandboxed."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5
    wall_s: float = 10
    memory_mb: int = 512
    processes: int = 32
    output_bytes: int = 1 << 20  # stdout and stderr together
    file_bytes: int = 1 << 24  # one file; each of the two tmpfs holds 4x this in all


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" | "memory" | "output" (cap) | "killed"
    returncode: int | None  # None when we killed it (timeout, output cap)
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.returncode == 0


@functools.cache
def _interpreter() -> tuple[str, tuple[str, ...]]:
    """The sandbox's Python and the read-only binds it needs besides /usr.

    The system python of our own version is preferred (nothing outside /usr); otherwise the base
    interpreter under this venv (e.g. pyenv's), with its prefix bound read-only. Either way it runs
    with -I -S, so no site-packages and no PYTHON* variables are used.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(f"/usr/bin/{version}") and os.path.isdir(f"/usr/lib/{version}"):
        return f"/usr/bin/{version}", ()
    real = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return real, () if prefix.startswith("/usr/") else ("--ro-bind", prefix, prefix)


def _argv(bwrap: str, prlimit: str, limits: Limits, source_fd: int) -> list[str]:
    python, binds = _interpreter()
    root = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: these are symlinks into /usr
            root += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            root += ["--ro-bind", top, top]
    cpu = max(1, math.ceil(limits.cpu_s))
    memory = limits.memory_mb << 20
    # prlimit runs inside: after bwrap set up the namespaces, so RLIMIT_NPROC counts this sandbox's
    # processes only (per user namespace) and RLIMIT_AS does not constrain bwrap's own setup.
    rlimits = [
        f"--cpu={cpu}:{cpu + 1}",  # SIGXCPU at the soft limit, SIGKILL a second later
        f"--as={memory}:{memory}",
        f"--nproc={limits.processes}:{limits.processes}",
        f"--fsize={limits.file_bytes}:{limits.file_bytes}",
        "--nofile=256:256",
        "--core=0:0",
    ]
    size = str(4 * limits.file_bytes)  # a few files at the cap, never the host's disk or all of memory
    return [
        bwrap,
        *("--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY)),
        *("--cap-drop", "ALL", "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"),
        *("--ro-bind", "/usr", "/usr", *root, *binds, "--proc", "/proc", "--dev", "/dev"),
        *("--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/sandbox"),
        *("--file", str(source_fd), "/sandbox/main.py", "--chdir", "/sandbox", "--setenv", "HOME", "/sandbox"),
        *("--", prlimit, *rlimits, python, "-I", "-S", "main.py"),
    ]


def _tools() -> tuple[str, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not on PATH: {INSTALL_HINT}")
    prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
    if prlimit is None:
        raise SandboxUnavailable("prlimit is missing from /usr/bin: apt-get install util-linux")
    return bwrap, prlimit


def _kill(proc: subprocess.Popen) -> None:
    # bwrap leads its own session; its namespace's pid 1 has --die-with-parent, and when that pid 1
    # dies the kernel kills every process left in the pid namespace. Only while bwrap is not reaped
    # yet is its pid (= its process group) certainly still ours.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(source: str, stdin: str, limits: Limits) -> Outcome:
    bwrap, prlimit = _tools()
    with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as inp:
        # Unlinked files: the program's source and stdin never exist under a host path it could reach.
        src.write(source.encode())
        inp.write(stdin.encode())
        src.seek(0)
        inp.seek(0)
        drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.getuid() == 0 else {}
        start = time.monotonic()
        argv = _argv(bwrap, prlimit, limits, src.fileno())
        with subprocess.Popen(
            argv,
            stdin=inp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(src.fileno(),),
            start_new_session=True,
            env={},
            **drop,
        ) as proc:
            try:
                out, killed = _collect(proc, start + limits.wall_s, limits.output_bytes)
            finally:  # also on our own errors (KeyboardInterrupt): never leave a sandbox running
                _kill(proc)
        wall = time.monotonic() - start
    stdout, stderr = (b"".join(out[name]).decode(errors="replace") for name in ("stdout", "stderr"))
    if killed:
        return Outcome(killed, None, stdout, stderr, wall)
    code = proc.returncode
    # bwrap's pid 1 reports a program killed by signal N as exit status 128 + N.
    if code == 0:
        status = "ok"
    elif code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timeout"  # the CPU rlimit (SIGKILL follows a second later, reported as "killed")
    elif "MemoryError" in stderr[-2000:]:
        status = "memory"
    elif code < 0 or code > 128:
        status = "killed"
    else:
        status = "error"
    return Outcome(status, code, stdout, stderr, wall)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[dict[str, list[bytes]], str]:
    """Read stdout and stderr until both close and the process exits, at most ``cap`` bytes in all and
    until ``deadline``; returns the chunks and "" or why the sandbox must be killed ("output", "timeout")."""
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    total = 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return out, "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                out[key.data].append(chunk[: cap - total + 1])
                total += len(chunk)
                if total > cap:
                    return out, "output"
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its pipes but still runs
        return out, "timeout"
    return out, ""


@functools.cache
def check_available() -> str:
    """One line describing the sandbox (bwrap version, interpreter), after running a trivial program in
    it; raises SandboxUnavailable with what to install or enable. Cached once it succeeds."""
    bwrap, _ = _tools()
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, env={}).stdout.strip()
    probe = _run("print('ok')", "", Limits())
    if probe.stdout.strip() != "ok":
        detail = (probe.stderr.strip().splitlines() or [probe.status])[-1]
        if "namespace" in detail or "Operation not permitted" in detail:
            hint = USERNS_HINT
        elif "Can't find source path" in detail:  # as root, bwrap runs as nobody: it must read the interpreter
            hint = (
                f"install python{sys.version_info.major}.{sys.version_info.minor} under /usr or make it world-readable"
            )
        else:
            hint = INSTALL_HINT
        raise SandboxUnavailable(f"{bwrap} cannot start a sandbox ({detail}): {hint}")
    return f"{version} ({bwrap}), python {_interpreter()[0]} -I -S, rlimits by prlimit"


def run_program(source: str, stdin: str = "", limits: Limits = Limits()) -> Outcome:
    """Run ``source`` as a Python program in a fresh sandbox; see the module docstring."""
    check_available()
    return _run(source, stdin, limits)


def passes_tests(solution: str, tests: str, limits: Limits = Limits()) -> bool:
    """True iff ``solution`` followed by ``tests`` (assert-style, as MBPP/HumanEval ship them) runs to
    the end and exits 0 in the sandbox. The token printed last proves the tests were reached: an early
    ``sys.exit(0)`` / ``os._exit(0)`` in the solution does not pass."""
    token = secrets.token_hex(16)
    outcome = run_program(f"{solution}\n{tests}\nprint({token!r})\n", limits=limits)
    return outcome.passed and outcome.stdout.rstrip().endswith(token)
