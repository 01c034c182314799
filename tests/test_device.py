"""A process that was given GPUs never trains on the CPU in silence: it stops at once, saying what was
expected, what torch sees and what to do; scripts/gpu_check.sh fails when it was to measure and could not.
These run on a CPU torch, which is what a GPU node with a CPU build (or a too-old driver) looks like."""

import json
import os
import subprocess
import sys

import pytest

from opdgeom.device import gpu_expected

from conftest import NO_GPU_GRANT, REPO, SETTINGS


@pytest.mark.parametrize(
    "environ, reason",
    [
        ({}, None),
        ({"SLURM_GPUS_ON_NODE": "8"}, "Slurm granted this job GPUs (SLURM_GPUS_ON_NODE=8)"),
        ({"SLURM_STEP_GPUS": "0,1"}, "Slurm granted this job GPUs (SLURM_STEP_GPUS=0,1)"),
        ({"SLURM_JOB_GPUS": "3"}, "Slurm granted this job GPUs (SLURM_JOB_GPUS=3)"),
        ({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ID": "7"}, None),  # a CPU job on a Slurm cluster
        ({"CUDA_VISIBLE_DEVICES": "0"}, None),  # not a grant: anyone may set it
        ({"OPDGEOM_DEVICE": "cuda"}, "OPDGEOM_DEVICE=cuda"),
        ({"OPDGEOM_DEVICE": "cpu", "SLURM_GPUS_ON_NODE": "2"}, None),  # CPU on purpose (fake GPUs)
        ({"OPDGEOM_DEVICE": "auto", "SLURM_JOB_GPUS": "0"}, "Slurm granted this job GPUs (SLURM_JOB_GPUS=0)"),
    ],
)
def test_a_gpu_is_expected_when_slurm_granted_one_or_the_setting_says_so(environ, reason):
    assert gpu_expected(environ) == reason


def test_a_bad_device_setting_is_refused_by_name():
    with pytest.raises(ValueError, match=r"OPDGEOM_DEVICE must be one of auto, cpu, cuda, got 'gpu'"):
        gpu_expected({"OPDGEOM_DEVICE": "gpu"})


def device_check(**environ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "opdgeom.device"]
    return subprocess.run(cmd, env={**NO_GPU_GRANT, **environ}, capture_output=True, text=True, timeout=120)


def test_a_process_granted_gpus_without_cuda_stops_with_what_was_expected_what_torch_sees_and_what_to_do():
    proc = device_check(SLURM_GPUS_ON_NODE="1")
    assert proc.returncode == 1 and proc.stdout == ""
    error = proc.stderr
    assert "a GPU was expected (Slurm granted this job GPUs (SLURM_GPUS_ON_NODE=1))" in error
    assert "torch.version.cuda=None, torch.cuda.is_available()=False" in error
    assert "Torch not compiled with CUDA enabled" in error  # torch's own reason
    assert "is a CPU build: run the job in an environment with the CUDA build" in error
    assert "set OPDGEOM_DEVICE=cpu" in error


def test_without_a_grant_the_cpu_is_used_and_cpu_on_purpose_overrides_one():
    assert (device_check().returncode, device_check().stdout) == (0, "cpu\n")
    on_purpose = device_check(SLURM_GPUS_ON_NODE="1", OPDGEOM_DEVICE="cpu")
    assert (on_purpose.returncode, on_purpose.stdout) == (0, "cpu\n"), on_purpose.stderr


def test_a_training_job_granted_gpus_fails_before_it_trains(tiny, tmp_path):
    spec = {"name": "sft", "method": "sft", "init": "student", "domain": "math", "train": SETTINGS}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(tiny["init"]),
           "--train-data", str(tiny["data"]), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env={**NO_GPU_GRANT, "SLURM_JOB_GPUS": "0"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "opdgeom train: error: a GPU was expected (Slurm granted this job GPUs (SLURM_JOB_GPUS=0))" in proc.stderr
    assert not out.exists()  # nothing trained, nothing written


# --- scripts/gpu_check.sh --------------------------------------------------------------------------

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  *) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15" ;;
esac
"""


def gpu_check(tmp_path, nvidia_smi: bool = False, **environ) -> subprocess.CompletedProcess:
    env = {**NO_GPU_GRANT, "PY": sys.executable, **environ}
    if nvidia_smi:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
        (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    script = REPO / "scripts" / "gpu_check.sh"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_check_without_any_sign_of_a_gpu_has_nothing_to_measure(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU here" in proc.stdout and "nothing to measure" in proc.stdout


@pytest.mark.parametrize(
    "why, nvidia_smi, environ",
    [
        ("told to measure", False, {"GPU_CHECK_REQUIRED": "1"}),
        ("nvidia-smi lists a GPU torch cannot use", True, {}),
        ("Slurm granted the job a GPU", False, {"SLURM_GPUS_ON_NODE": "1"}),
    ],
)
def test_gpu_check_fails_when_it_was_to_measure_and_could_not(tmp_path, why, nvidia_smi, environ):
    proc = gpu_check(tmp_path, nvidia_smi, **environ)
    assert proc.returncode == 1, f"{why}: {proc.stdout}"
    assert "a GPU was expected" in proc.stderr and "torch.cuda.is_available()=False" in proc.stderr, why
    assert "nothing measured" in proc.stderr and "nothing to measure" not in proc.stdout, why
    if nvidia_smi:  # the driver it reports is part of the reason
        assert "nvidia-smi: NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15" in proc.stderr


def test_gpu_check_refuses_a_bad_setting_by_name(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_REQUIRED="yes")
    assert proc.returncode == 2 and "GPU_CHECK_REQUIRED must be 0 or 1, got 'yes'" in proc.stderr
