"""What a training run reports besides its log lines: the tracker's series and the live channel monitor.

The loop calls ``step`` after every optimizer step and ``checkpoint`` after every save. Every rank runs
the monitor (its sums are collectives over the row shards); only rank 0's tracker writes (the others
hold a NullTracker) and only rank 0 writes ``monitor.parquet`` (the monitor's rows: step, tensor,
metric, numel, value; the summaries under tensor ``all:matrix``), atomically, at every checkpoint and
at the end, so a resumed run continues the table from its last checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opdgeom.tracking import NullTracker, Tracker
from opdgeom.train.distributed import SINGLE, World, global_sum

if TYPE_CHECKING:  # imported when a run is monitored (polars, scipy: start-up a plain job does not pay)
    from opdgeom.geometry.live import MonitorSettings

MONITOR_FILE = "monitor.parquet"


def _log(msg: str, world: World) -> None:
    if world.is_main:
        print(msg, file=sys.stderr, flush=True)


class RunWatch:
    def __init__(
        self, model, steps: int, checkpoint_steps: list[int], run_dir: Path, tracker: Tracker | None = None,
        monitor: MonitorSettings | None = None, world: World = SINGLE,
    ):  # fmt: skip
        """Build it before the run resumes: the model's weights are then the init, W_0 of the monitor."""
        self.run_dir, self.world = Path(run_dir), world
        self.tracker = tracker or NullTracker()
        self.monitor = None
        if monitor is not None:
            from opdgeom.geometry.live import ChannelMonitor

            self.monitor = ChannelMonitor(
                model, monitor, steps, checkpoint_steps, reduce=lambda t: global_sum(t, world)
            )
        self.rows: list[dict] = []
        self.step_seconds: list[float] = []

    def resume(self, start: int) -> None:
        """Continue from step ``start``: the monitor's rows up to it, and its reference subspace if the
        reference checkpoint is behind (read back from that checkpoint)."""
        if self.monitor is None or start == 0:
            return
        import polars as pl

        path = self.run_dir / MONITOR_FILE
        if path.exists():
            self.rows = pl.read_parquet(path).filter(pl.col("step") <= start).to_dicts()
        if start >= self.monitor.reference_step:
            self.monitor.restore_reference(self.run_dir / f"step_{self.monitor.reference_step:06d}")

    def step(self, model, done: int, metrics: dict[str, float], step_s: float) -> None:
        self.tracker.log(done, metrics, prefix="train")
        self.step_seconds.append(step_s)
        if self.monitor is None or not self.monitor.due(done):
            return
        t0 = time.perf_counter()
        report = self.monitor.observe(model, done)
        cost_s = time.perf_counter() - t0
        self.rows += report.rows
        self.tracker.log(done, report.summary, prefix="geometry")
        mean_step = sum(self.step_seconds) / len(self.step_seconds)
        summary = " ".join(f"{k}={v:.4g}" for k, v in report.summary.items())
        _log(f"geometry step {done}: {summary} ({cost_s:.2f}s, {cost_s / mean_step:.1%} of a step)", self.world)
        for alert in report.alerts:
            _log(alert, self.world)
            self.tracker.event(done, "channel_alert", alert)

    def checkpoint(self) -> None:
        if self.monitor is not None and self.world.is_main:
            import polars as pl

            from opdgeom.io import write_parquet

            schema = {"step": pl.Int64, "tensor": pl.Utf8, "metric": pl.Utf8, "numel": pl.Int64, "value": pl.Float64}
            write_parquet(pl.DataFrame(self.rows, schema=schema), self.run_dir / MONITOR_FILE)

    def close(self) -> None:
        self.checkpoint()
        self.tracker.close()
