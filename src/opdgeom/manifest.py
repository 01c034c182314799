"""A run's manifest.json: its spec and every checkpoint (step 0 is the init model itself).

Written by the training loop, read by evaluation, the diagnostics and the CLI. Paths inside are
relative to the run folder, so a results tree can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opdgeom.io import write_text

MANIFEST = "manifest.json"


def write_manifest(
    run_dir: str | Path, run: dict, init_path: str | Path, records: list[dict], extra: dict | None = None
) -> Path:
    """manifest.json: the run's settings (``run``, its spec as JSON) and every checkpoint record."""
    run_dir = Path(run_dir)
    init_rel = os.path.relpath(Path(init_path), run_dir)
    entries = [{"step": 0, "path": init_rel, "tokens": 0, "loss": None, "wall_time": 0.0}, *records]
    manifest = {"run": run, "checkpoints": entries, **(extra or {})}
    return write_text(json.dumps(manifest, indent=2), run_dir / MANIFEST)


def read_manifest(path: str | Path) -> list[dict]:
    """Checkpoint records with absolute-or-cwd-relative paths resolved against the run folder."""
    path = Path(path)
    manifest = json.loads(path.read_text())
    return [{**c, "path": str(Path(os.path.normpath(path.parent / c["path"])))} for c in manifest["checkpoints"]]


def run_name(path: str | Path) -> str:
    """The run a manifest describes."""
    return json.loads(Path(path).read_text())["run"]["name"]
