"""Opt-in experiment tracking for training and evaluation jobs: ``tracker: none | tensorboard | wandb | trackio``.

Every backend writes the run's files inside the run directory:

- ``tensorboard``: event files under ``<run_dir>/tensorboard`` (scalars, the config as text and as
  hparams, events as text); the run's name is its folder. View: ``tensorboard --logdir results/<family>/runs``.
- ``wandb``: offline by default (``wandb_mode``), so no login and no network; the run lands in
  ``<run_dir>/wandb/offline-run-*``. Upload later: ``wandb sync <run_dir>/wandb/offline-run-*``.
  ``wandb_mode: online`` needs ``WANDB_API_KEY`` or ``wandb login``; without a terminal it fails fast.
  (wandb's service keeps its own debug log in ``WANDB_CACHE_DIR``, by default ``~/.cache/wandb``.)
- ``trackio``: its SQLite project under ``<run_dir>/trackio`` (trackio reads ``TRACKIO_DIR`` once, at
  import, so one trackio run directory per process). View: ``TRACKIO_DIR=<run_dir>/trackio trackio show``.

Metrics go under ``<prefix>/<key>`` (``train/loss``, ``eval/accuracy``) at the caller's step, values
through ``float()`` and non-finite ones as they are, so a NaN loss shows up in the tracker. Under
torchrun only rank 0 logs: other ranks, and ``tracker: none``, get a ``NullTracker`` that imports and
writes nothing. Third-party packages are imported inside the backend that needs them.
"""

from __future__ import annotations

import html
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class TrackerSettings:
    kind: str = "none"
    project: str = "opdgeom"
    wandb_mode: str = "offline"

    def __post_init__(self):
        if self.kind not in TRACKERS:
            raise ValueError(f"tracker: {self.kind!r} is not one of {', '.join(TRACKERS)}")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode: {self.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}")


def _keyed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {(f"{prefix}/{k}" if prefix else k): float(v) for k, v in metrics.items()}


def _plain(config: dict) -> dict:
    """The config as JSON types: trackers reject Paths and other objects a run spec may hold."""
    return json.loads(json.dumps(config, default=str))


class Tracker:
    """Logs per-step scalars and discrete events of one run; ``close`` flushes and is idempotent."""

    _closed = False

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        raise NotImplementedError

    def event(self, step: int, name: str, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finish()

    def _finish(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullTracker(Tracker):
    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        pass

    def event(self, step: int, name: str, text: str) -> None:
        pass

    def _finish(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._writer.add_text("config", "```json\n" + json.dumps(_plain(config), indent=2, sort_keys=True) + "\n```")
        # add_hparams would open a second event file in a timestamped subfolder; writing the three
        # summaries ourselves keeps the HParams entry in this run's own file.
        flat = {k: v for k, v in _flatten(_plain(config)).items() if v is not None}
        for summary in hparams(flat, {}):
            self._writer.file_writer.add_summary(summary)

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        for key, value in _keyed(metrics, prefix).items():
            self._writer.add_scalar(key, value, global_step=step)

    def event(self, step: int, name: str, text: str) -> None:
        self._writer.add_text(f"events/{name}", text, global_step=step)

    def _finish(self) -> None:
        self._writer.close()  # flushes


def _flatten(config: Mapping, head: str = "") -> dict:
    """Nested config -> ``{"a/b": scalar}``; lists become their JSON text (hparams take scalars only)."""
    flat = {}
    for key, value in config.items():
        name = f"{head}/{key}" if head else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


class WandbTracker(Tracker):
    def __init__(self, settings: TrackerSettings, run_name: str, run_dir: Path, config: dict):
        import wandb

        self._wandb = wandb
        # create_new keeps several trackers of one job apart; silent (the WANDB_SILENT setting), console
        # off and no stats thread: the job's own log and throughput are what we measure.
        self._run = wandb.init(
            project=settings.project,
            name=run_name,
            dir=str(run_dir),
            config=_plain(config),
            mode=settings.wandb_mode,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
        )

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        self._run.log(_keyed(metrics, prefix), step=step)

    def event(self, step: int, name: str, text: str) -> None:
        # run.alert needs the server; an Html panel keeps the note in the offline run.
        self._run.log({f"events/{name}": self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def _finish(self) -> None:
        self._run.finish()


class TrackioTracker(Tracker):
    def __init__(self, settings: TrackerSettings, run_name: str, run_dir: Path, config: dict):
        target = (run_dir / "trackio").resolve()
        if "trackio" in sys.modules:
            # TRACKIO_DIR is a module constant copied into trackio's submodules at import.
            current = sys.modules["trackio"].utils.TRACKIO_DIR
            if Path(current).resolve() != target:
                raise RuntimeError(f"trackio already writes to {current} in this process, not {target}")
        else:
            os.environ["TRACKIO_DIR"] = str(target)
        target.mkdir(parents=True, exist_ok=True)
        import trackio

        self._trackio = trackio
        self._run = trackio.init(
            project=settings.project,
            name=run_name,
            config=_plain(config),
            embed=False,
            auto_log_gpu=False,
            auto_log_cpu=False,
        )

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        self._run.log(_keyed(metrics, prefix), step=step)

    def event(self, step: int, name: str, text: str) -> None:
        self._run.alert(title=name, text=text, level=self._trackio.AlertLevel.INFO, step=step)

    def _finish(self) -> None:
        self._run.finish()


def open_tracker(settings: TrackerSettings, run_name: str, run_dir: Path, config: dict, rank: int = 0) -> Tracker:
    """The tracker for one run; ranks other than 0 and ``tracker: none`` get a ``NullTracker``."""
    if settings.kind == "none" or rank != 0:
        return NullTracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings.kind == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if settings.kind == "wandb":
        return WandbTracker(settings, run_name, run_dir, config)
    return TrackioTracker(settings, run_name, run_dir, config)
