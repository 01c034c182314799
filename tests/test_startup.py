"""`python -m opdgeom`'s process settings (issue 28): the cyclic collector's full passes deferred before a
step's imports, and skipped at exit, without changing what a step does or returns."""

import subprocess
import sys

from conftest import REPO

PROBE = """
import gc, sys
passes = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and passes.append(1))
import opdgeom.__main__ as entry
assert gc.get_threshold()[2] == 100, gc.get_threshold()
import torch, transformers.models.qwen3.modeling_qwen3  # what a training job imports before its first step
print(len(passes), gc.get_freeze_count())
status = entry.run(sys.argv[1:])
print(status, gc.get_freeze_count() > 100_000)
"""


def test_the_entry_point_defers_full_collections_during_imports_and_freezes_at_exit(tmp_path):
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    argv = ["tokenizer", "--out", str(tmp_path / "tok")]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    passes, frozen_before, status, frozen_after = proc.stdout.split()
    # With the default third threshold (10) these imports take ~6 full passes; deferred, at most one.
    assert int(passes) <= 1 and frozen_before == "0"
    assert status == "0" and frozen_after == "True"  # main's status passed through, then everything frozen
    assert (tmp_path / "tok" / "tokenizer.json").exists()  # the step did its work


def test_python_m_opdgeom_runs_the_step_and_exits_with_its_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "opdgeom", "tokenizer", "--out", str(tmp_path / "tok")], cwd=REPO)
    assert ok.returncode == 0 and (tmp_path / "tok" / "tokenizer.json").exists()
    bad = subprocess.run([sys.executable, "-m", "opdgeom", "no-such-step"], capture_output=True, cwd=REPO)
    assert bad.returncode == 2


def test_the_installed_console_script_runs_through_the_same_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "opdgeom"]
    assert script.value == "opdgeom.__main__:run"
