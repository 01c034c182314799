import os
import sys
from pathlib import Path

import pytest

from opdgeom.models import build_model, save_model
from opdgeom.tasks import MathTask, split, write_jsonl
from opdgeom.tokenizer import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The environment without a Slurm grant or a device setting, for scripts checked in the "nothing says a GPU
# was expected" cases (the parent's own must not leak in).
NO_GPU_GRANT = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OPDGEOM_DEVICE"}


@pytest.fixture
def repo() -> Path:
    return REPO


# Jobs call `python -m opdgeom`: make that the interpreter running the tests, however pytest was started.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(sys.executable)), os.environ["PATH"]])


def run_snakemake(*args, cwd=REPO, env=None):
    import subprocess

    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


# `snakemake -n` under conda deployment (the Slurm profile's) asks conda where it keeps environments;
# there is no conda on the test machines, so this stands in for it (the answers a real conda 25 gives;
# nothing is built or run by it).
FAKE_CONDA = """#!/bin/sh
case "$*" in
  "info --json") echo '{"conda_prefix": "/nonexistent", "root_prefix": "/nonexistent", "platform": "linux-64"}' ;;
  "--version") echo "conda 25.5.1" ;;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
  *) echo "fake conda: $* is not faked" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def conda_env(tmp_path) -> dict:
    """The environment of a process that finds the stand-in conda first on PATH."""
    bin_dir = tmp_path / "fake-conda-bin"
    bin_dir.mkdir()
    (bin_dir / "conda").write_text(FAKE_CONDA)
    (bin_dir / "conda").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


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


# Training tests share these: a one-layer Qwen3 and settings that run a method in seconds.
TINY = {
    "source": "build", "architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip
SETTINGS = {
    "steps": 6, "batch_size": 4, "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 1, "grad_clip": 1.0,
    "checkpoint_every": 3, "max_new_tokens": 8, "temperature": 1.0, "group_size": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A one-layer student init, a teacher and math training data (one set per test module)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    save_model(build_model(TINY, tok, seed=0), tok, root / "init")
    save_model(build_model(TINY, tok, seed=1), tok, root / "teacher")
    train, _ = split(MathTask(), 64, 8, seed=0)
    write_jsonl(root / "train.jsonl", train)
    return {"init": root / "init", "teacher": root / "teacher", "data": root / "train.jsonl"}
