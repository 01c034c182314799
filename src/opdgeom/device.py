"""Which device this process computes on (training, evaluation and rollouts share the choice).

A process that was given GPUs must compute on them: when torch cannot use CUDA there (a CPU build of
torch, a driver too old for the CUDA 13 wheel) it stops at once with the reason instead of training on
the CPU for days. "Given GPUs" is read from the scheduler's grant, which every Slurm GPU job and job
step carries whatever launched it (sbatch, srun, torchrun below srun): ``SLURM_GPUS_ON_NODE``,
``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``. ``CUDA_VISIBLE_DEVICES`` is not a grant (users, containers
and launchers set it, to empty or to -1 as well, and the CPU tests may run under it). ``OPDGEOM_DEVICE``
says it outright: ``cuda`` (a GPU is required, with or without Slurm), ``cpu`` (compute on the CPU even
where GPUs were granted, as on the local test cluster's fake GPUs), ``auto`` or unset (the grant decides).

``python -m opdgeom.device`` prints the device this process would use, or the reason it cannot (exit 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

import torch

SETTING = "OPDGEOM_DEVICE"
CHOICES = ("auto", "cpu", "cuda")
SLURM_GRANTS = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
DRIVER = "R580"  # the oldest NVIDIA driver series that runs CUDA 13, the build of PyPI's torch 2.13.0 wheel


def device_setting(environ: Mapping[str, str] = os.environ) -> str:
    setting = environ.get(SETTING, "auto").strip().lower() or "auto"
    if setting not in CHOICES:
        raise ValueError(f"{SETTING} must be one of {', '.join(CHOICES)}, got {environ[SETTING]!r}")
    return setting


def gpu_expected(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this process must compute on a GPU (the setting or the Slurm grant that says so), else None."""
    setting = device_setting(environ)
    if setting != "auto":
        return f"{SETTING}={setting}" if setting == "cuda" else None
    for name in SLURM_GRANTS:
        value = environ.get(name, "").strip()
        # SLURM_GPUS_ON_NODE is a count (0 on a CPU job); the others list GPU indices, "0" among them.
        granted = value.isdigit() and int(value) > 0 if name == "SLURM_GPUS_ON_NODE" else value not in ("", "(null)")
        if granted:
            return f"Slurm granted this job GPUs ({name}={value})"
    return None


def _nvidia_smi() -> str:
    """The GPUs and driver nvidia-smi reports, or why it reports none."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not on PATH (no NVIDIA driver installed here?)"
    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        shown = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi: {err}"
    lines = (shown.stdout.strip() or shown.stderr.strip() or f"exit {shown.returncode}").splitlines()
    return "nvidia-smi: " + "; ".join(lines)


def _cuda_error() -> str:
    """Why torch cannot initialise CUDA, in torch's words (the driver error when there is one)."""
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises AssertionError for a CPU build, RuntimeError for driver errors
        return f"{type(err).__name__}: {err}"
    return "torch.cuda.init() succeeded but no device is visible"


def cuda_missing(reason: str) -> RuntimeError:
    """The error of a process that was given GPUs and cannot use them: what was expected, what torch
    sees, and what to do."""
    built = torch.version.cuda
    if built is None:
        advice = (
            f"this torch ({torch.__version__}) is a CPU build: run the job in an environment with the CUDA "
            "build (envs/train.yaml or envs/vllm-gpu.yaml with software-deployment-method: conda, "
            "docs/cluster.md)"
        )
    else:
        advice = (
            f"this torch ({torch.__version__}) is built for CUDA {built} and cannot start it: PyPI's torch "
            f"2.13.0 wheel is a CUDA 13 build and needs an NVIDIA driver of the {DRIVER} series or newer "
            "(compare the driver nvidia-smi shows), or the node's GPUs are not visible to this process"
        )
    return RuntimeError(
        f"a GPU was expected ({reason}) but torch cannot use CUDA: torch.version.cuda={built}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()}, {_cuda_error()}; {_nvidia_smi()}. "
        f"To fix: {advice}. To compute on the CPU on purpose, set {SETTING}=cpu."
    )


def local_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU; a process
    that was given GPUs (``gpu_expected``) and cannot use CUDA raises ``cuda_missing``."""
    if device_setting() == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        reason = gpu_expected()
        if reason is not None:
            raise cuda_missing(reason)
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def free_cached_memory() -> None:
    """Hand the caching allocator's unused blocks back to the driver (``torch.cuda.empty_cache``).

    A vLLM engine waking from sleep maps its memory through its own allocator, outside torch's
    cache: blocks the trainer freed but torch still holds are invisible to it and it runs out of
    memory beside them (TRL's colocate mode and verl's sharding manager empty the cache before
    every wake for this reason). A no-op where CUDA was never initialized (CPU jobs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main() -> int:
    try:
        device = local_device()
    except (RuntimeError, ValueError) as err:
        print(f"opdgeom.device: error: {err}", file=sys.stderr)
        return 1
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"{device}{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
