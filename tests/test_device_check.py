"""scripts/gpu_check.sh's steps and scripts/device_check.sh, the lent GPU machine's one prepared call, around
everything but the GPU: a stand-in python says "cuda" when asked for the device and records every other
command, so the steps, their order, arguments, limits and exit statuses are what is checked; the wheel
install runs for real (pip into a folder, a tarball unpacked beside it) and the installed modules must
import on the path the checks get."""

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import NO_GPU_GRANT, REPO

# Answers "cuda" for `-m opdgeom.device` (after importing $PROBE, when set, so the path is checked too),
# "no vLLM" for `-c "import vllm"`, runs real python for pip, the unpacking and the version printout, records the rest
# (and the two settings gpu_check is handed) and fails with 3 the commands naming $FAIL.
FAKE_PY = """#!/usr/bin/env bash
if [[ $1 == -m && $2 == opdgeom.device ]]; then
    if [[ -n ${PROBE:-} ]]; then exec "$REAL_PY" -c "import $PROBE; print('cuda')"; fi
    echo cuda; exit 0
fi
if [[ $1 == -c && $2 == "import vllm" ]]; then exit 1; fi
if [[ $1 == - || $1 == -c || ( $1 == -m && $2 == pip ) ]]; then
    [[ $1 == -m ]] && echo "pip $*" >>"$CALLS"
    exec "$REAL_PY" "$@"
fi
echo "$* [required=${GPU_CHECK_REQUIRED:-} limit=${GPU_CHECK_TIMEOUT:-}]" >>"$CALLS"
if [[ -n ${FAIL:-} && $* == *"$FAIL"* ]]; then exit 3; fi
"""


def _run(script: str, tmp_path: Path, args=(), **environ) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {**NO_GPU_GRANT, "PY": str(fake), "REAL_PY": sys.executable, "CALLS": str(calls), **environ}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True, timeout=120
    )
    return proc, calls.read_text().splitlines()


def test_gpu_check_runs_its_default_steps_in_order_with_the_extra_arguments_for_the_memory_benchmark(tmp_path):
    proc, calls = _run("gpu_check.sh", tmp_path, ["--layers", "8"])
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["benchmarks/bench_train_memory.py"] + ["-m"] * 4 + [
        "benchmarks/gpu_smoke.py"
    ]
    assert calls[0].endswith("--steps 3 --layers 8 [required= limit=]")
    assert "memory-plan --family llama3-8b --gpu-mem-gb 80 --evaluate" in calls[4]
    assert calls[5].startswith("benchmarks/gpu_smoke.py --engine hf")  # no vLLM under this python
    assert "gpu_smoke on transformers engines" in proc.stdout


def test_gpu_check_runs_every_step_and_exits_with_a_failing_ones_status(tmp_path):
    proc, calls = _run(
        "gpu_check.sh", tmp_path, GPU_CHECKS="vs_trl plans monitor", GPU_CHECK_TIMEOUT="240", FAIL="bench_monitor"
    )
    assert proc.returncode == 3
    assert calls[0].startswith("benchmarks/bench_vs_trl.py --gpu --rounds 4 --max-wall-s 160")
    assert len(calls) == 6 and calls[5].startswith("benchmarks/bench_monitor.py --gpu")  # the steps after ran
    assert "step monitor failed (exit 3)" in proc.stderr and "step vs_trl failed" not in proc.stderr


def test_gpu_check_refuses_a_limit_that_is_not_whole_seconds(tmp_path):
    proc, calls = _run("gpu_check.sh", tmp_path, GPU_CHECK_TIMEOUT="4m")
    assert proc.returncode == 2 and not calls
    assert "GPU_CHECK_TIMEOUT must be a whole number of seconds, got '4m'" in proc.stderr


def test_a_failing_memory_plan_ends_the_plans_step(tmp_path):
    proc, calls = _run("gpu_check.sh", tmp_path, GPU_CHECKS="plans", FAIL="qwen3-8b --gpus 8")
    assert proc.returncode == 3 and len(calls) == 1, calls
    assert "step plans failed (exit 3)" in proc.stderr


def _wheel(folder: Path) -> None:
    """A real (pure-python) wheel of one module, as pip installs it."""
    info = "devcheckprobe-0.1.dist-info"
    files = {
        "devcheckprobe.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: devcheckprobe\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / "devcheckprobe-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


def _runtime_tarball(folder: Path) -> None:
    """polars' runtime travels as a tarball of installed files; this one holds one package."""
    with tarfile.open(folder / "probe_runtime.tar.xz", "w:xz") as tar:
        data = b"READY = True\n"
        member = tarfile.TarInfo("./probe_runtime/__init__.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))


def test_device_check_installs_the_carried_wheels_once_and_hands_gpu_check_a_required_gpu(tmp_path):
    wheels, site, out = tmp_path / "whl", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    out.mkdir()
    _wheel(wheels)
    _runtime_tarball(wheels)
    environ = {"DEVICE_WHEELS": str(wheels), "DEVICE_SITE": str(site), "OUT": str(out)}
    environ |= {"PROBE": "devcheckprobe, probe_runtime", "OPDGEOM_COMMIT": "abc123"}
    proc, calls = _run("device_check.sh", tmp_path, ["plans"], **environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "devcheckprobe.py").is_file() and (site / "probe_runtime" / "__init__.py").is_file()
    assert sum(c.startswith("pip ") for c in calls) == 1
    plan_calls = [c for c in calls if not c.startswith("pip ")]
    assert len(plan_calls) == 4 and all(c.endswith("[required=1 limit=240]") for c in plan_calls)
    log = (out / "device_check.log").read_text()
    assert "device_check: commit abc123" in log and "device_check: Python " in log and "torch " in log
    assert "gpu_check: measuring on cuda" in log
    proc, calls = _run("device_check.sh", tmp_path, ["plans"], **environ)  # the machine is still warm
    assert proc.returncode == 0 and not any(c.startswith("pip ") for c in calls)


def test_device_check_without_wheels_says_so_and_a_bad_step_is_refused_by_name(tmp_path):
    proc, _ = _run("device_check.sh", tmp_path, ["memory", "speed"], DEVICE_WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 2
    assert "no " in proc.stdout and "device_wheels.sh makes it" in proc.stdout
    assert "GPU_CHECKS has an unknown step 'speed'" in proc.stderr


@pytest.mark.parametrize("required, status", [("1", 1), ("0", 0)])
def test_device_check_on_a_machine_without_a_gpu(tmp_path, required, status):
    """The real python and torch here (a CPU build): required, it fails saying why; else nothing to measure."""
    env = {
        **NO_GPU_GRANT,
        "PY": sys.executable,
        "GPU_CHECK_REQUIRED": required,
        "DEVICE_WHEELS": str(tmp_path / "none"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "device_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    if status:
        assert "a GPU was expected" in proc.stderr and "nothing measured" in proc.stderr
    else:
        assert "nothing to measure" in proc.stdout
