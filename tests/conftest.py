import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo() -> Path:
    return REPO

# Jobs call `python -m opdgeom`: make that the interpreter running the tests, however pytest was started.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(sys.executable)), os.environ["PATH"]])


def run_snakemake(*args, cwd=REPO):
    import subprocess

    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """The smoke study, run once per session with the local profile (results/<family> folder)."""
    results = tmp_path_factory.mktemp("smoke")
    proc = run_snakemake(
        "--profile", "profiles/local", "--configfile", "config/smoke.yaml",
        "--config", f"results_dir={results}", f"cache_dir={results}/cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return results / "tiny-qwen3"
