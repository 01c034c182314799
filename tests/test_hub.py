"""Hub models on offline nodes: rule `model` resolves a pinned revision from a Hugging Face cache laid
out as `hf download` leaves it (snapshots/<commit>/ links into blobs/, refs/<branch>), without network."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file

from opdgeom.models import build_model, save_model
from opdgeom.tokenizer import build_char_tokenizer

from conftest import REPO, TINY
from fakehub import serve

COMMIT_A = "a" * 39 + "1"
COMMIT_B = "b" * 39 + "2"


def _blob_name(path: Path) -> str:
    """How the hub names a blob: sha256 for LFS files (weights), the git blob sha1 for the rest."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hf_cache(hub: Path, repo: str, folder: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay ``folder`` out in ``hub`` the way huggingface_hub stores a downloaded snapshot."""
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo_dir / "blobs" / _blob_name(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """An HF_HOME whose cache holds a student (branch main) and a teacher (by commit only)."""
    root = tmp_path_factory.mktemp("hf")
    tok = build_char_tokenizer()
    for name, seed, commit, ref in [("student", 0, COMMIT_A, "main"), ("teacher", 1, COMMIT_B, None)]:
        save_model(build_model(TINY, tok, seed=seed), tok, root / "src" / name)
        write_hf_cache(root / "home" / "hub", f"opdgeom-test/tiny-{name}", root / "src" / name, commit, ref)
    return root / "home"


def offline_env(hf_home: Path) -> dict:
    # An endpoint nothing listens on: any request would fail loudly instead of reaching a hub.
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


def run_model_rule(hf_home: Path, repo: str, revision: str, out: Path) -> subprocess.CompletedProcess:
    spec = json.dumps({"source": "hub", "repo": repo, "revision": revision})
    cmd = [sys.executable, "-m", "opdgeom", "model", "--spec", spec, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=offline_env(hf_home), timeout=120)


def test_the_fixture_cache_is_what_huggingface_hub_reads(hf_home):
    info = {r.repo_id: r for r in scan_cache_dir(hf_home / "hub").repos}
    student = info["opdgeom-test/tiny-student"]
    assert [rev.commit_hash for rev in student.revisions] == [COMMIT_A]
    assert set(next(iter(student.revisions)).refs) == {"main"}
    assert {f.file_name for f in next(iter(student.revisions)).files} >= {"config.json", "model.safetensors"}


@pytest.mark.parametrize("revision, commit", [("main", COMMIT_A), (COMMIT_A, COMMIT_A)])
def test_offline_cache_gives_a_linked_model_folder_with_the_commit(hf_home, tmp_path, revision, commit):
    out = tmp_path / "student"
    proc = run_model_rule(hf_home, "opdgeom-test/tiny-student", revision, out)
    assert proc.returncode == 0, proc.stderr
    assert (out / ".revision").read_text().strip() == commit
    assert json.loads((out / ".source.json").read_text())["revision"] == revision
    weights = out / "model.safetensors"
    cached = (hf_home / "hub/models--opdgeom-test--tiny-student/snapshots" / COMMIT_A / "model.safetensors").resolve()
    assert not weights.is_symlink() and weights.stat().st_ino == cached.stat().st_ino, "not a hard link to the blob"
    source = load_file(hf_home.parent / "src" / "student" / "model.safetensors")
    for name, tensor in load_file(weights).items():
        assert torch.equal(tensor, source[name]), name
    assert not list(tmp_path.glob(".student.tmp-*"))


def test_missing_revision_offline_names_repo_revision_cache_and_command(hf_home, tmp_path):
    proc = run_model_rule(hf_home, "opdgeom-test/tiny-student", COMMIT_B, tmp_path / "student")
    assert proc.returncode == 1
    assert f"opdgeom-test/tiny-student@{COMMIT_B} is not in the Hugging Face cache {hf_home / 'hub'}" in proc.stderr
    assert f"hf download opdgeom-test/tiny-student --revision {COMMIT_B}" in proc.stderr
    assert not (tmp_path / "student").exists()


def test_partial_snapshot_is_refused_by_name(hf_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(hf_home, home, symlinks=True)
    snapshot = home / "hub/models--opdgeom-test--tiny-student/snapshots" / COMMIT_A
    (snapshot / "model.safetensors").unlink()  # an interrupted download: the weights never arrived
    proc = run_model_rule(home, "opdgeom-test/tiny-student", "main", tmp_path / "student")
    assert proc.returncode == 1
    assert "lacks *.safetensors" in proc.stderr
    assert not (tmp_path / "student").exists()


def test_fetch_models_reports_every_cached_model_of_a_family(hf_home, tmp_path):
    families = tmp_path / "families"
    families.mkdir()
    (families / "cached-tiny.yaml").write_text(json.dumps(family("cached-tiny")))
    cmd = [sys.executable, "-m", "opdgeom", "fetch-models", "--family", "cached-tiny", "--families-dir", str(families)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=offline_env(hf_home), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"teacher: opdgeom-test/tiny-teacher@{COMMIT_B} = {COMMIT_B}" in proc.stderr
    assert f"student: opdgeom-test/tiny-student@main = {COMMIT_A}" in proc.stderr


def family(name: str) -> dict:
    student = {"source": "hub", "repo": "opdgeom-test/tiny-student", "revision": "main"}
    teacher = {"source": "hub", "repo": "opdgeom-test/tiny-teacher", "revision": COMMIT_B}
    models = {"student": student, "teacher": teacher, "student_alt": student, "teacher_alt": teacher}
    return {"name": name, "tokenizer": "model", "models": models}


@pytest.mark.workflow
def test_rule_model_through_snakemake_offline(hf_home, tmp_path):
    """A user's own family preset whose models live in the pre-filled cache: `snakemake ... models/<m>`."""
    work = tmp_path / "work"
    work.mkdir()
    for part in ("Snakefile", "workflow", "config", "envs", "profiles"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, work / part)
    (work / "src").symlink_to(REPO / "src")
    (work / "config" / "families" / "cached-tiny.yaml").write_text(json.dumps(family("cached-tiny")))
    targets = [f"results/cached-tiny/models/{m}" for m in ("student", "teacher")]
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", *targets, "--config", "family=cached-tiny"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=offline_env(hf_home), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = work / "results/cached-tiny/models"
    assert (models / "student/.revision").read_text().strip() == COMMIT_A
    assert (models / "teacher/.revision").read_text().strip() == COMMIT_B
    assert (models / "teacher/model.safetensors").stat().st_nlink >= 2  # shares the cache's blob


def test_memory_plan_reads_an_unlisted_models_shape_from_the_cache(hf_home):
    code = (
        "from opdgeom.train.memory_plan import shape_of; "
        "s = shape_of({'source': 'hub', 'repo': 'opdgeom-test/tiny-student', 'revision': 'main'}); "
        "print(s.hidden_size, s.num_hidden_layers, s.head_dim, s.vocab_size)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(hf_home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        str(TINY["hidden_size"]),
        str(TINY["num_hidden_layers"]),
        str(TINY["head_dim"]),
        "100",
    ]


def online_env(home: Path, server) -> dict:
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    return {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
    }


def test_online_the_rule_downloads_into_the_cache_and_a_rerun_reuses_it_offline(hf_home, tmp_path):
    server = serve({"org/online": (COMMIT_A, hf_home.parent / "src" / "student")})
    try:
        spec = json.dumps({"source": "hub", "repo": "org/online", "revision": "main"})
        cmd = [sys.executable, "-m", "opdgeom", "model", "--spec", spec, "--out"]
        home = tmp_path / "home"
        proc = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, env=online_env(home, server))
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown()
    snapshot = home / "hub/models--org--online/snapshots" / COMMIT_A
    assert (home / "hub/models--org--online/refs/main").read_text() == COMMIT_A  # into the cache itself
    assert (tmp_path / "a/model.safetensors").stat().st_ino == (snapshot / "model.safetensors").resolve().stat().st_ino
    # The server is gone: a second family (another model folder) finds everything in the cache.
    again = subprocess.run([*cmd, str(tmp_path / "b")], capture_output=True, text=True, env=offline_env(home))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b/.revision").read_text().strip() == COMMIT_A


def test_an_interrupted_download_leaves_no_model_folder(hf_home, tmp_path):
    server = serve({"org/flaky": (COMMIT_A, hf_home.parent / "src" / "student")}, broken={"model.safetensors"})
    try:
        spec = json.dumps({"source": "hub", "repo": "org/flaky", "revision": "main"})
        cmd = [sys.executable, "-m", "opdgeom", "model", "--spec", spec, "--out", str(tmp_path / "m")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=online_env(tmp_path / "home", server))
    finally:
        server.shutdown()
    assert proc.returncode == 1
    assert "could not download org/flaky@main" in proc.stderr
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))
