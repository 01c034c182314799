"""The verifier of real math domains: the last `\\boxed{}` answer, compared by math-verify.

What is extracted. A completion's final answer is the content of its LAST `\\boxed{...}` (also
`\\fbox{...}` and the brace-less `\\boxed 5`, braces matched with nesting, so
`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`); a completion without a box falls back to the text
after the last "####" (GSM8K demonstrations end with "#### 72", see `opdgeom.tasks.base`). A last
box whose braces never close (a truncated completion) is no answer, and neither is an empty one.
The reference answer may itself be boxed, end with "#### ...", or be plain ("72", "1/2",
"\\frac{1}{2}", "(0, 1]", "{1,2}", "x^2+2x+1").

What equivalence means. Both answers are parsed into SymPy objects by math-verify
(`math_verify.parse`, LaTeX first, then plain expressions) and compared by `math_verify.verify`
with the reference as gold: numbers equal after rounding to 6 decimals (`\\frac{1}{2}` = 0.5 =
1/2, 72 = 72.0, 1,000 = 1000), expressions equal when their difference simplifies to zero
((x+1)^2 = x^2+2x+1, 2\\sqrt{2} = \\sqrt{8}), intervals with their open/closed ends ((0,1] is not
(0,1)), sets regardless of order, tuples in order; `\\text{...}` units, `^\\circ` and `\\$` are
dropped. Identical answer strings are equal without parsing.

The time limit and why. Simplifying an adversarial answer (a power tower such as
`9^{9^{9^{9}}}`, a huge polynomial expansion) can run for minutes. math-verify's own timeouts use
`signal.alarm`, which only works in the main thread (a rollout scorer in a thread pool raises) and
cannot interrupt C code that holds the interpreter (SymPy's big-integer arithmetic). So the
comparison runs in a separate, long-lived worker process (`python -c` importing this module,
talking JSON lines over pipes), with math-verify's signal timeouts disabled there; the caller waits
at most `timeout_s` for the answer, and on overrun kills the worker (SIGKILL), scores 0, writes one
line to stderr, and starts a replacement worker at once (about 0.7 s to import SymPy), so the next
call finds it ready. Reusing the worker keeps a call at math-verify's own cost plus a pipe round trip
(measured on 2 CPU cores: 1.4 ms per typical answer, against 1.6 ms for math-verify in-process; a
process per call costs ~700 ms as a fresh interpreter, ~90 ms forked from a preloaded forkserver).
The worker is a plain subprocess rather than a `multiprocessing` child, so it never re-imports the
training script's `__main__` (torch, CUDA; forkserver and spawn both do) and is safe to start after
CUDA is initialised. Calls from several threads are serialised on one worker; a forked child (a
data loader worker) starts its own. The worker exits with its caller (end of input, the kernel's
parent-death signal, a watchdog thread).
"""

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from opdgeom.tasks.base import ANSWER_MARK, extract_answer

# Seconds a new worker may take to import SymPy and math-verify; not counted in any answer's limit.
STARTUP_TIMEOUT_S = 120.0

# \boxed or \fbox as a whole control word (not \boxedsymbol).
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in `text`, else None.

    Braces nest (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); escaped braces `\\{ \\}` inside do not
    count. None when there is no box or the last box's braces are unbalanced. The brace-less form
    takes the token up to the next whitespace or `$`.
    """
    if not isinstance(text, str):
        return None
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    i = boxes[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        end = i
        while end < len(text) and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[i:end] or None
    depth = 0
    j = i
    while j < len(text):
        if text[j] == "\\":
            j += 2  # an escaped character: \{ and \} are literal braces, \\ a line break
            continue
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def final_answer(text: str) -> str | None:
    """The answer a completion (or a reference) ends with: its last box, else after "####", else None.

    A last box that is empty or never closes is no answer (None), whatever precedes it.
    """
    if not isinstance(text, str):
        return None
    if _BOX.search(text):
        boxed = last_boxed(text)
        return boxed.strip() if boxed is not None and boxed.strip() else None
    if ANSWER_MARK in text:
        return extract_answer(text) or None
    return None


def math_equal(predicted: str, reference: str, timeout_s: float = 5.0) -> bool:
    """True iff the answer `predicted` is mathematically equal to `reference` (see module doc).

    Both are answers, not whole completions (a boxed one is unboxed first). The comparison runs in
    the worker process and is abandoned after `timeout_s` seconds: then the worker is killed, one
    line goes to stderr, and the result is False. Never raises on malformed answers.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if not isinstance(predicted, str) or not isinstance(reference, str):
        return False
    predicted, reference = _unbox(predicted), _unbox(reference)
    if not predicted or not reference:
        return False
    if predicted == reference:
        return True
    return _pool.compare(predicted, reference, timeout_s)


def verify_math(completion: str, answer: str, timeout_s: float = 5.0) -> float:
    """Reward 1.0 iff the completion's final answer (last box, else "####") equals `answer`.

    `answer` may be plain, boxed, or end with "#### ..."; no answer in the completion scores 0.0.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    try:
        predicted = final_answer(completion)
        reference = final_answer(answer) if isinstance(answer, str) else None
        if reference is None and isinstance(answer, str):
            reference = answer.strip()
    except Exception:  # noqa: BLE001 - malformed input scores 0, never raises
        return 0.0
    if not predicted or not reference:
        return 0.0
    return float(math_equal(predicted, reference, timeout_s))


def _unbox(text: str) -> str:
    text = text.strip()
    if _BOX.search(text):
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip()
    return text


def _log(message: str) -> None:
    try:
        sys.stderr.write(f"opdgeom.tasks.answers: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Worker:
    """One worker process: send a request line, read one answer line within a deadline."""

    def __init__(self) -> None:
        src = str(Path(__file__).resolve().parents[2])
        # The kernel kills the worker when the thread that started it ends (PR_SET_PDEATHSIG), so ask
        # for that only from the main thread, whose end is the process's.
        tied = threading.current_thread() is threading.main_thread()
        code = f"import sys; sys.path.insert(0, {src!r}); from opdgeom.tasks.answers import _serve; _serve({tied})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.buffer = b""
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the worker has imported math-verify (it starts right away, in the background)."""
        if self.ready:
            return
        line = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        message = json.loads(line) if line else {"error": "it exited or sent nothing"}
        if message.get("ready") is not True:
            self.kill()
            raise RuntimeError(f"the math-verify worker did not start: {message.get('error', message)}")
        self.ready = True

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the worker, or None on timeout or when the worker has died."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def ask(self, predicted: str, reference: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it overran `timeout_s` or died."""
        request = json.dumps({"p": predicted, "r": reference}).encode() + b"\n"
        try:
            self.process.stdin.write(request)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            return None
        return bool(json.loads(line)["eq"])

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.process.stdin.close()  # the worker exits on end of input
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


class _Pool:
    """The process-wide worker: started on first use, replaced after a kill, per process id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: _Worker | None = None
        self.pid = os.getpid()

    def _get(self) -> _Worker:
        if self.pid != os.getpid():  # forked: the parent's worker and pipes are not ours
            self.lock = threading.Lock()
            self.worker, self.pid = None, os.getpid()
        if self.worker is None or not self.worker.alive():
            self.worker = _Worker()
        self.worker.wait_ready()
        return self.worker

    def compare(self, predicted: str, reference: str, timeout_s: float) -> bool:
        with self.lock:
            worker = self._get()
            verdict = worker.ask(predicted, reference, timeout_s)
            if verdict is not None:
                return verdict
            died = not worker.alive()
            worker.kill()
            try:
                self.worker = _Worker()  # its start overlaps whatever the caller does next
            except OSError:
                self.worker = None
        reason = "the worker died" if died else f"timed out after {timeout_s:g} s (limit), worker killed"
        _log(f"math_equal {reason}, scored 0: predicted={predicted[:80]!r} reference={reference[:80]!r}")
        return False

    def start(self) -> None:
        with self.lock:
            self._get()

    def close(self) -> None:
        with self.lock:
            if self.worker is not None and self.pid == os.getpid():
                self.worker.close()
            self.worker = None


_pool = _Pool()
atexit.register(_pool.close)


def start_worker() -> None:
    """Start the worker now (about a second), so that the first `math_equal` is fast."""
    _pool.start()


def _equal_in_worker(predicted: str, reference: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def parsed(answer: str) -> list:
        latex = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        result = parse("\\boxed{" + answer + "}", extraction_config=latex, parsing_timeout=None)
        if not result:
            result = parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
        return result

    gold, target = parsed(reference), parsed(predicted)
    if not gold or not target:
        return False
    return bool(verify(gold, target, allow_set_relation_comp=True, timeout_seconds=None))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent's starting thread ends (no-op elsewhere)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(tied_to_parent: bool = False) -> None:
    """The worker's loop: a JSON request per line on stdin, a JSON verdict per line back.

    The worker must not outlive its caller in the middle of a long computation: SymPy's big-integer
    arithmetic holds the interpreter lock, so a watchdog thread alone cannot stop it; the kernel's
    parent-death signal can (when the caller started the worker from its main thread).
    """
    import logging

    parent = os.getppid()
    if tied_to_parent:
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the answer stream

    def orphan_watch() -> None:  # otherwise: exit once reparented, between two Python bytecodes
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()
    try:
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _equal_in_worker("\\frac{1}{2}", "0.5")  # import and warm the parsers before "ready"
    except Exception as error:  # noqa: BLE001 - reported to the caller, which raises
        out.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        return
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            verdict = _equal_in_worker(request["p"], request["r"])
        except Exception:  # noqa: BLE001 - a malformed answer scores 0, never kills the worker
            verdict = False
        out.write(json.dumps({"eq": verdict}) + "\n")
