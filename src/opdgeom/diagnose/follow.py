"""``opdgeom watch BASE RUN_DIR``: follow a checkpoint folder while a trainer writes it.

Every poll the folder is scanned for *complete* checkpoints; when that set changes, the diagnose
tables, figures and page are rebuilt from the base and the complete checkpoints (through one
statistics cache, so a checkpoint seen before costs a lookup, not a decomposition), and each new
checkpoint's trajectory summary goes to the tracker when one is given.

A checkpoint is complete when (per layout):

- every layout: its weights parse. A full model: ``config.json`` is JSON, and ``model.safetensors``
  or every shard ``model.safetensors.index.json`` names exists with a safetensors header whose
  tensors fit in the file's real size (a file still being written is shorter than its header says).
  A PEFT adapter: ``adapter_config.json`` is JSON and ``adapter_model.safetensors`` passes the same check;
- ``opdgeom`` (``step_NNNNNN/``): nothing more. The exporter builds the folder under a temporary
  name and renames it into place, and ``manifest.json``, once written, lists the run's checkpoints;
- ``trl`` (``checkpoint-N/``): the Trainer writes ``trainer_state.json`` into the folder after the
  weights, so a folder holding a parseable one is complete; a folder without one must also be stable;
- ``verl`` (``global_step_N/actor/huggingface/``) and TRL folders without ``trainer_state.json``:
  stable, i.e. no file's size or mtime changed between two consecutive scans, or none was modified
  within the last poll interval.

A checkpoint once accepted stays accepted while its folder exists (a trainer's ``save_total_limit``
may delete old ones: they leave the page at the next update).

The watch ends after one pass (``once``); when the writer marks the run finished: a ``.finished`` file
in RUN_DIR (any writer may touch it), this project's ``manifest.json`` whose records reach the spec's
``train.steps``, TRL's ``trainer_state.json`` in RUN_DIR itself (``Trainer.save_state``) or a
checkpoint whose ``trainer_state.json`` has ``global_step == max_steps``; on SIGINT/SIGTERM (the update
in progress is finished first); or after ``max_idle_s`` without a new checkpoint. When the run is marked
finished, the weights check alone decides (the writer has said it is done), so the last pass waits for
no stability interval.

The page is the diagnose output folder (tables/, figures/, inputs.json, index.html). Unlike
``diagnose``, OUT is not swapped as a whole (a tracker may keep files open in it): each update is
built in a temporary folder inside OUT, then tables/ and figures/ are swapped in by rename and
inputs.json and index.html replaced atomically, index.html last (it embeds the figures).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opdgeom.diagnose.lora import ADAPTER_WEIGHTS
from opdgeom.diagnose.pipeline import Settings, compute_tables, prepare, write_outputs
from opdgeom.diagnose.sources import (
    ADAPTER_CONFIG,
    TRL_DIR,
    VERL_DIR,
    Checkpoint,
    Run,
    has_weights,
    is_adapter,
    resolve_model,
)
from opdgeom.geometry.cache import StatCache
from opdgeom.geometry.stream import CheckpointError, _read_header, read_checkpoint

STEP_DIR = re.compile(r"^step_(\d+)$")
FINISHED = ".finished"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


def _log(text: str) -> None:
    print(f"watch: {text}", file=sys.stderr, flush=True)


def _json(path: Path):
    """The parsed file, or None when absent, being written or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _adapter(folder: Path) -> bool:
    return is_adapter(folder) and not has_weights(folder)


def weights_problem(folder: Path) -> str | None:
    """Why the folder's weights cannot be read yet (None: they can)."""
    if _adapter(folder):
        if _json(folder / ADAPTER_CONFIG) is None:
            return f"{ADAPTER_CONFIG} unreadable"
        try:
            _read_header(folder / ADAPTER_WEIGHTS)
        except CheckpointError as exc:
            return str(exc)
        return None
    if _json(folder / "config.json") is None:
        return "config.json missing or unreadable"
    try:
        read_checkpoint(folder)  # index, every shard present, headers fit the real file sizes
    except CheckpointError as exc:
        return str(exc)
    return None


def signature(folder: Path) -> tuple:
    """(relative path, size, mtime) of every file below ``folder``."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


@dataclass
class Candidate:
    step: int
    path: Path  # the weights folder
    atomic: bool = False  # renamed into place by its writer (this project's exporter)
    state: Path | None = None  # TRL's trainer_state.json of this checkpoint


def candidates(run_dir: Path) -> tuple[str | None, list[Candidate]]:
    """(layout, checkpoint folders present) of a run folder being written; (None, []) before any."""
    manifest = _json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None
    if manifest is not None:
        found = []
        for record in manifest.get("checkpoints", []):
            path = Path(record["path"])
            path = path if path.is_absolute() else run_dir / path
            if int(record["step"]) > 0:
                found.append(Candidate(int(record["step"]), path, atomic=True))
        return "opdgeom", found
    numbered: dict[str, list[tuple[int, Path]]] = {"step": [], "trl": [], "verl": []}
    try:
        children = list(run_dir.iterdir())
    except FileNotFoundError:
        return None, []
    for child in children:
        for layout, pattern in (("step", STEP_DIR), ("trl", TRL_DIR), ("verl", VERL_DIR)):
            match = pattern.match(child.name)
            if match and child.is_dir():
                numbered[layout].append((int(match.group(1)), child))
    if numbered["trl"]:
        return "trl", [Candidate(s, p, state=p / TRAINER_STATE) for s, p in sorted(numbered["trl"])]
    if numbered["verl"]:
        hf = [(s, p / "actor" / "huggingface") for s, p in sorted(numbered["verl"])]
        return "verl", [Candidate(s, p) for s, p in hf if p.is_dir()]
    if numbered["step"]:
        return "opdgeom", [Candidate(s, p, atomic=True) for s, p in sorted(numbered["step"]) if s > 0]
    return None, []


def finished(run_dir: Path, layout: str | None, accepted: dict[int, Candidate]) -> str | None:
    """Why the writer's run is over (None: it is not marked finished)."""
    if (run_dir / FINISHED).exists():
        return f"{FINISHED} present"
    manifest = _json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None
    if manifest is not None:
        steps = (manifest.get("run") or {}).get("train", {}).get("steps")
        reached = max((int(r["step"]) for r in manifest.get("checkpoints", [])), default=0)
        if steps is None or reached >= int(steps):
            return f"{MANIFEST} records reach step {reached}"
    if layout is None:
        layout = candidates(run_dir)[0]
    if layout == "trl":
        if (run_dir / TRAINER_STATE).is_file():
            return f"{TRAINER_STATE} in the run folder"
        for cand in accepted.values():
            state = _json(cand.state) if cand.state is not None else None
            if isinstance(state, dict) and state.get("max_steps") and state.get("global_step") == state["max_steps"]:
                return f"checkpoint-{cand.step} reached max_steps {state['max_steps']}"
    return None


@dataclass
class Scanner:
    """Accepts checkpoints of one run folder once they are complete (see the module docstring)."""

    run_dir: Path
    settle_s: float
    accepted: dict[int, Candidate] = field(default_factory=dict)
    seen: dict[Path, tuple] = field(default_factory=dict)  # signature at the previous scan
    waiting: set[Path] = field(default_factory=set)  # incomplete folders already reported
    layout: str | None = None

    def scan(self, trust: bool = False) -> dict[int, Candidate]:
        """Complete checkpoints by step; ``trust``: the run is finished, skip the stability wait."""
        self.layout, found = candidates(self.run_dir)
        present = {c.step for c in found}
        for step in [s for s in self.accepted if s not in present or not self.accepted[s].path.is_dir()]:
            _log(f"step {step} ({self.accepted.pop(step).path}) is gone; it leaves the page")
        for cand in found:
            if cand.step in self.accepted:
                continue
            problem = weights_problem(cand.path) if cand.path.is_dir() else "folder not there yet"
            if problem is None and not (cand.atomic or trust or self._state_written(cand)):
                problem = self._unstable(cand.path)
            if problem is None:
                self.accepted[cand.step] = cand
                self.seen.pop(cand.path, None)
            elif cand.path not in self.waiting:
                self.waiting.add(cand.path)
                _log(f"waiting for step {cand.step} ({cand.path.name}): {problem}")
        return dict(sorted(self.accepted.items()))

    @staticmethod
    def _state_written(cand: Candidate) -> bool:
        return cand.state is not None and isinstance(_json(cand.state), dict)

    def _unstable(self, folder: Path) -> str | None:
        sig = signature(folder)
        previous = self.seen.get(folder)
        self.seen[folder] = sig
        newest = max((mtime for _, _, mtime in sig), default=0) / 1e9
        if sig == previous or time.time() - newest >= self.settle_s:
            return None
        return "files still changing"


def _swap_in(tmp: Path, out: Path) -> None:
    """Move tables/, figures/, inputs.json and index.html (last) from ``tmp`` into ``out``."""
    for name in ("tables", "figures"):
        if not (tmp / name).exists():
            continue
        if (out / name).exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=out))
            os.replace(out / name, retired / name)
            os.replace(tmp / name, out / name)
            shutil.rmtree(retired)
        else:
            os.replace(tmp / name, out / name)
    for name in ("inputs.json", "index.html"):
        os.replace(tmp / name, out / name)


def write_update(
    base: str, base_folder: Path, base_how: str, run: Run, out: Path, settings: Settings, cache: StatCache | None
) -> tuple[dict, dict]:
    """diagnose's tables, figures, inputs.json and index.html for ``run``, swapped into ``out``."""
    started = time.perf_counter()
    counted_from = (cache.hits, cache.misses) if cache else (0, 0)
    prepared = prepare(base_folder, run)
    tables = compute_tables([prepared], settings, cache)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".watch-tmp-", dir=out))
    try:
        summary = write_outputs(tmp, base, base_folder, base_how, [run], tables, settings, cache, started, counted_from)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary, tables


def tracker_rows(trajectory, steps: list[int]) -> dict[int, dict[str, float]]:
    """Per new step: the median over layer matrices of each trajectory metric (the page's table)."""
    from opdgeom.diagnose.report import trajectory_summary

    summary = trajectory_summary(trajectory)
    out = {}
    for row in summary.iter_rows(named=True):
        if row["step"] in steps:
            out[row["step"]] = {k: float("nan") if v is None else v for k, v in row.items() if k != "step"}
    return out


class _Stop:
    """SIGINT/SIGTERM set an event (main thread only); the loop ends after the update in progress."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        _log(f"{signal.Signals(signum).name}: stopping after the update in progress")
        self.event.set()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def follow(
    base: str,
    run_dir: str | Path,
    out: str | Path,
    settings: Settings | None = None,
    poll_s: float = 10.0,
    max_idle_s: float | None = None,
    once: bool = False,
    tracker=None,
    on_update: Callable[[dict], None] | None = None,
) -> int:
    """Follow ``run_dir`` (see the module docstring); returns the number of page updates.

    ``on_update(info)`` is called after each update with steps, new steps, seconds and the statistics
    computed/reused by that update.
    """
    settings = settings or Settings()
    run_dir, out = Path(run_dir), Path(out)
    base_folder, base_how = resolve_model(base, settings.allow_download)
    cache = StatCache(settings.cache) if settings.use_cache else None
    scanner = Scanner(run_dir, settle_s=poll_s)
    published: list[int] = []
    logged: set[int] = set()
    updates = 0
    last_new = time.monotonic()
    _log(f"following {run_dir} (poll {poll_s:g} s) -> {out / 'index.html'}")
    with _Stop() as stop:
        while True:
            done = finished(run_dir, scanner.layout, scanner.accepted)
            complete = scanner.scan(trust=done is not None)
            if done is None and (done := finished(run_dir, scanner.layout, scanner.accepted)) is not None:
                complete = scanner.scan(trust=True)  # marked finished by a checkpoint just accepted
            steps = list(complete)
            if steps and steps != published:
                new = [s for s in steps if s not in published]
                if new:
                    last_new = time.monotonic()
                layout = scanner.layout or "?"
                if layout == "trl" and any(_adapter(c.path) for c in complete.values()):
                    layout = "trl+peft"
                checkpoints = [Checkpoint(s, c.path, adapter=_adapter(c.path)) for s, c in complete.items()]
                run = Run(run_dir.resolve().name, layout, str(run_dir), checkpoints)
                started = time.perf_counter()
                try:
                    summary, tables = write_update(base, base_folder, base_how, run, out, settings, cache)
                except Exception as exc:  # a checkpoint deleted or rewritten under us: retry next poll
                    _log(f"update failed ({type(exc).__name__}: {exc}); retrying at the next poll")
                    summary = None
                if summary is not None:
                    updates += 1
                    published = steps
                    seconds = time.perf_counter() - started
                    stats = summary["cache"] or {"computed": None, "reused": None}
                    added = f"+{len(new)} new (step{'s' if len(new) > 1 else ''} {', '.join(map(str, new))})"
                    _log(
                        f"{len(steps)} checkpoint{'s' if len(steps) > 1 else ''}, {added if new else 'some removed'}, "
                        f"page updated in {seconds:.1f} s "
                        f"(statistics: {stats['computed']} computed, {stats['reused']} reused)"
                    )
                    fresh = [s for s in new if s not in logged]
                    if tracker is not None and fresh:
                        rows = tracker_rows(tables[run.name]["trajectory"], fresh)
                        for step in fresh:
                            tracker.log(step, rows.get(step, {}), prefix="geometry")
                    logged.update(fresh)
                    if on_update is not None:
                        on_update({"steps": steps, "new": new, "seconds": seconds, **stats})
            if once:
                break
            if done is not None and steps == published:
                _log(f"run finished ({done}); {len(published)} checkpoints on the page")
                break
            if stop.event.is_set():
                break
            if max_idle_s is not None and time.monotonic() - last_new >= max_idle_s:
                _log(f"no new checkpoint for {max_idle_s:g} s; stopping")
                break
            if stop.event.wait(poll_s):
                break
    if not published:
        _log(f"no complete checkpoint in {run_dir}; no page written")
    return updates
