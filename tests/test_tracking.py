"""The experiment trackers, read back with each tracker's own reader: what was logged is what is stored."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from opdgeom import tracking

CONFIG = {"method": "opd", "optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "out": Path("/runs/x"), "flag": True}
PLAIN = {"method": "opd", "optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "out": "/runs/x", "flag": True}
# Keys with "/" and a non-finite value, both logged as they are.
SERIES = {1: {"loss": 2.5, "kl/reverse": float("nan"), "lr": 1e-4}, 3: {"loss": 1.25, "kl/reverse": 0.5, "lr": 5e-5}}


def _log_series(tracker: tracking.Tracker) -> None:
    for step, metrics in SERIES.items():
        tracker.log(step, metrics)
    tracker.log(3, {"accuracy": 0.75}, prefix="eval")
    tracker.event(3, "alert", "channel <kl> drifted")


def _expected() -> dict[str, list[tuple[int, float]]]:
    out = {f"train/{k}": [(s, m[k]) for s, m in SERIES.items()] for k in SERIES[1]}
    out["eval/accuracy"] = [(3, 0.75)]
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """No real home, no network: W&B offline, nothing from the developer's environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DISABLED", "WANDB_API_KEY", "WANDB_DIR", "TRACKIO_DIR", "TRACKIO_SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "run"


def test_a_bad_kind_or_wandb_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"tracker: 'mlflow' is not one of none, tensorboard, wandb, trackio"):
        tracking.TrackerSettings(kind="mlflow")
    with pytest.raises(ValueError, match=r"wandb_mode: 'shared' is not one of offline, online, disabled"):
        tracking.TrackerSettings(kind="wandb", wandb_mode="shared")


def test_none_and_nonzero_ranks_import_and_write_nothing(tmp_path):
    script = f"""
import sys
from pathlib import Path
import opdgeom.tracking as t
cases = [(t.TrackerSettings(), 0)] + [(t.TrackerSettings(kind), 1) for kind in ("tensorboard", "wandb", "trackio")]
for i, (settings, rank) in enumerate(cases):
    run_dir = Path({str(tmp_path)!r}) / f"run{{i}}"
    run_dir.mkdir()
    with t.open_tracker(settings, "r", run_dir, {{"a": 1}}, rank=rank) as tr:
        assert isinstance(tr, t.NullTracker)
        tr.log(1, {{"loss": 1.0}})
        tr.event(1, "alert", "x")
print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'trackio', 'tensorboardX')))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_tensorboard_event_files_hold_the_series_and_the_config(sandbox):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracking.open_tracker(tracking.TrackerSettings("tensorboard"), "r", sandbox, CONFIG) as tracker:
        _log_series(tracker)
    acc = EventAccumulator(str(sandbox / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(_expected())
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731  (TensorBoard stores float32)
    for tag, series in _expected().items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in series], tag
        assert all(_same(g, f32(v)) for (_, g), (_, v) in zip(got, series)), (tag, got)
    (config,) = acc.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == PLAIN
    (event,) = acc.Tensors("events/alert/text_summary")
    assert (event.step, event.tensor_proto.string_val[0].decode()) == (3, "channel <kl> drifted")
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def _wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of chunks
    with a 7-byte crc/length/type header), each a `wandb.proto` Record; wandb ships no Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pos, chunks = [], head, b""
    while pos + head <= len(data):
        if block - pos % block < head:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + head])
        chunks += data[pos + head : pos + head + length]
        pos += head + length
        if kind in (1, 4):  # FULL or LAST chunk ends a record
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_holds_the_series_and_the_config(sandbox):
    settings = tracking.TrackerSettings("wandb")
    with tracking.open_tracker(settings, "opd-seed0", sandbox, CONFIG) as tracker:
        _log_series(tracker)
    (run_file,) = (sandbox / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("opd-seed0", "opdgeom")
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == PLAIN
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
            for key in _expected():
                if key in row:
                    series.setdefault(key, []).append((int(row["_step"]), float(json.loads(row[key]))))
    assert series.keys() == _expected().keys()
    for key, want in _expected().items():
        assert [s for s, _ in series[key]] == [s for s, _ in want], key
        assert all(_same(g, v) for (_, g), (_, v) in zip(series[key], want)), (key, series[key])
    assert list(run_file.parent.glob("files/media/html/events/alert_3_*.html"))


def test_trackio_project_holds_the_series_the_config_and_the_event(sandbox, monkeypatch):
    # The tracker sets TRACKIO_DIR before trackio's first import; setting it here undoes that afterwards.
    monkeypatch.setenv("TRACKIO_DIR", str((sandbox / "trackio").resolve()))
    with tracking.open_tracker(tracking.TrackerSettings("trackio"), "opd-seed0", sandbox, CONFIG) as tracker:
        _log_series(tracker)
    from trackio.sqlite_storage import SQLiteStorage

    assert list((sandbox / "trackio").glob("*.db"))
    logs = SQLiteStorage.get_logs("opdgeom", "opd-seed0")
    for key, want in _expected().items():
        got = [(row["step"], row[key]) for row in logs if key in row]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(_same(float(g), v) for (_, g), (_, v) in zip(got, want)), (key, got)
    config = SQLiteStorage.get_run_config("opdgeom", "opd-seed0")
    assert {k: config[k] for k in PLAIN} == PLAIN
    (alert,) = SQLiteStorage.get_alerts("opdgeom", run_name="opd-seed0")
    assert (alert["title"], alert["text"], alert["step"]) == ("alert", "channel <kl> drifted", 3)


def test_evaluate_logs_a_checkpoints_metrics_under_eval(tiny, sandbox):
    """`opdgeom evaluate --tracker tensorboard --tracker-dir RUN`: the table's numbers at the checkpoint's step."""
    import polars as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opdgeom.cli import main as cli_main

    out = sandbox / "eval.parquet"
    argv = ["evaluate", "--ref", "run", "--model", str(tiny["init"]), "--eval-data", str(tiny["data"]),
            "--domain", "math", "--max-new-tokens", "4", "--batch-size", "8", "--out", str(out),
            "--tracker", "tensorboard", "--tracker-dir", str(sandbox / "run")]  # fmt: skip
    assert cli_main(argv) == 0
    row = pl.read_parquet(out).row(0, named=True)
    events = EventAccumulator(str(sandbox / "run" / "tensorboard"))
    events.Reload()
    [accuracy], [nll] = events.Scalars("eval/accuracy"), events.Scalars("eval/nll")
    assert accuracy.step == nll.step == row["step"] == 0
    assert accuracy.value == pytest.approx(row["accuracy"]) and nll.value == pytest.approx(row["nll"], rel=1e-6)
    with pytest.raises(SystemExit, match="--tracker needs --tracker-dir"):
        cli_main(argv[:-2])
