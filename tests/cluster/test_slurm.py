"""The Slurm path for real: a throwaway two-node cluster on this host (scripts/local_slurm), the
smoke study submitted job by job through sbatch with the project's Slurm profile, the same numbers
as a local run of the same study, one training job spread over both nodes, and a job granted GPUs
that torch cannot use stopping at once."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from safetensors.torch import load_file

from opdgeom.train.checkpoint import full_trainer_state

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "local_slurm"
PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
RUNS = ("slurm", "local")  # the two ways the smoke study is run and compared
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (daemons, /etc/slurm/slurm.conf, mknod)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    try:
        subprocess.run([SCRIPTS / "start.sh"], check=True)
        yield
    finally:
        subprocess.run([SCRIPTS / "stop.sh"], check=True)


def profile_for_local_cluster(tmp_path: Path, **set_resources) -> Path:
    """profiles/slurm as it is, less what only a real cluster has, plus fast polling and ``set_resources``."""
    profile = {**PROFILE, "default-resources": dict(PROFILE["default-resources"])}
    profile["set-resources"] = {**PROFILE["set-resources"], **set_resources}
    del profile["default-resources"]["slurm_account"]  # accounts need slurmdbd; the plugin goes on without
    del profile["software-deployment-method"]  # no conda here: jobs run in this interpreter's environment
    del profile["set-threads"]  # one thread per job, as in the local run: same numbers, 2 real cores
    profile.update({
        "jobs": 2,
        "retries": 0,
        "slurm-status-command": "squeue",  # no slurmdbd, so no sacct; start.sh keeps MinJobAge high
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-logdir": str(tmp_path / "slurm_logs"),
        "slurm-keep-successful-logs": True,
    })  # fmt: skip
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    return tmp_path / "profile"


# The nodes' GPUs are /dev/null clones and torch here is a CPU build: jobs that Slurm grants them
# compute on the CPU because they are told to (opdgeom.device), as the local run does.
CPU_ON_FAKE_GPUS = {**os.environ, "OPDGEOM_DEVICE": "cpu"}


def run_smoke(
    profile: Path, results: Path, *targets: str, configfiles: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(profile),
         "--configfile", "config/smoke.yaml", *configfiles,
         "--config", f"results_dir={results}", f"cache_dir={results}/cache", "--rerun-triggers", "mtime",
         "--", *targets],
        cwd=REPO, capture_output=True, text=True, env=CPU_ON_FAKE_GPUS,
    )  # fmt: skip


def expected_request(rule: str) -> dict:
    resources = {**PROFILE["default-resources"], **PROFILE["set-resources"].get(rule, {})}
    if rule in ("train", "evaluate"):
        # The rules set their GPUs from the family: a tiny one trains in one process, and evaluates on
        # evaluate.gpus GPUs (1 unless the preset says otherwise).
        resources["gpu"] = 1
    return {
        "JobState": "COMPLETED",
        "Partition": resources["slurm_partition"],
        "NumCPUs": str(resources["cpus_per_task"]),
        "MinMemoryNode": f"{resources['mem_mb']}M",
        "TresPerJob": f"gres:gpu:{resources['gpu_model']}:{resources['gpu']}" if "gpu" in resources else None,
    }


def granted(slurm_jobid: str) -> dict:
    cmd = ["scontrol", "-o", "show", "job", slurm_jobid]
    shown = subprocess.run(cmd, capture_output=True, text=True, check=True)
    fields = dict(kv.split("=", 1) for kv in shown.stdout.split() if "=" in kv)
    mem = fields["MinMemoryNode"]  # scontrol writes whole gigabytes as G
    fields["MinMemoryNode"] = f"{int(mem[:-1]) * 1024}M" if mem.endswith("G") else mem
    return {key: fields.get(key) for key in ("JobState", "Partition", "NumCPUs", "MinMemoryNode", "TresPerJob")}


def test_smoke_study_through_sbatch_matches_a_local_run(cluster, tmp_path, smoke):
    proc = run_smoke(profile_for_local_cluster(tmp_path), tmp_path / "slurm")
    log = proc.stdout + proc.stderr
    (tmp_path / "slurm.log").write_text(log)  # kept under pytest's basetemp for a post-mortem
    assert proc.returncode == 0, log[-6000:]

    submitted = {jobid: Path(path) for jobid, path in SUBMITTED.findall(log)}
    rules = {jobid: re.search(r"/rule_(\w+)/", str(path)).group(1) for jobid, path in submitted.items()}
    # Every job went through sbatch (only the target rule `all` ran on the submit host), and every
    # rule the profile names exists in the workflow.
    assert sorted(re.findall(r"^rule (\w+):", log, re.M)) == sorted(rules.values()), log[-4000:]
    assert re.findall(r"^localrule (\w+):", log, re.M) == ["all"]
    assert set(PROFILE["set-resources"]) <= set(rules.values())
    for jobid, rule in rules.items():
        assert submitted[jobid].exists(), f"no Slurm log for job {jobid} ({rule})"
        assert granted(jobid) == expected_request(rule), f"job {jobid} ({rule})"

    # The reference is the session's local smoke run (tests/conftest.py). Training on CPU is
    # deterministic and both runs use one thread per job: every figure's table must agree to the bit.
    figures = {"slurm": tmp_path / "slurm" / "tiny-qwen3" / "figures", "local": smoke / "figures"}
    tables = {run: sorted(p.name for p in folder.glob("*.csv")) for run, folder in figures.items()}
    assert tables["slurm"] == tables["local"] and {"table1.csv", "accuracy.csv"} <= set(tables["local"])
    for name in tables["local"]:
        slurm_run, local_run = (pl.read_csv(figures[run] / name) for run in RUNS)
        assert slurm_run.equals(local_run), f"{name}\nSlurm:\n{slurm_run}\nlocal:\n{local_run}"


def test_training_spans_two_nodes(cluster, tmp_path, smoke):
    """A family asking for two nodes (train_resources: {nodes: 2, gpus_per_node: 1}): rule train
    becomes sbatch --nodes=2, the job step runs the rule's shell once, srun starts one torchrun per
    node, and FSDP2 (gloo) joins one rank per node. The result is the smoke study's one-process SFT
    run up to float summation order."""
    results = tmp_path / "results"  # the smoke study's outputs less the run: only training is left
    shutil.copytree(smoke.parent, results, ignore=lambda folder, names: ["sft"] if folder.endswith("runs") else [])
    # Typed GPUs go into gres on several nodes (--gpus would count GPUs per job): no gpu_model here.
    train = {k: v for k, v in PROFILE["set-resources"]["train"].items() if k != "gpu_model"}
    # Two CPUs per node for its one rank: the launch sets OMP_NUM_THREADS=2 for the ranks through srun,
    # over the 1 Snakemake exports (this test profile has no set-threads).
    train.update(cpus_per_task=2)
    two_nodes_config = tmp_path / "two_nodes.yaml"
    two_nodes_config.write_text(
        yaml.safe_dump({"family_overrides": {"train_resources": {"nodes": 2, "gpus_per_node": 1}}})
    )
    run = results / "tiny-qwen3" / "runs" / "sft"
    profile = profile_for_local_cluster(tmp_path, train=train)
    proc = run_smoke(profile, results, str(run / "manifest.json"), configfiles=(two_nodes_config,))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    [(jobid, _)] = SUBMITTED.findall(log)
    shown = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, check=True)
    fields = dict(kv.split("=", 1) for kv in shown.stdout.split() if "=" in kv)
    assert (fields["JobState"], fields["NumNodes"], fields["NodeList"]) == ("COMPLETED", "2", "n[1-2]")

    train_log = (results / "tiny-qwen3" / "logs" / "train" / "sft.log").read_text()
    # The c10d rendezvous numbers ranks in the order the nodes' agents join, so which node holds
    # rank 0 varies from run to run; what must hold is one rank on each node.
    placed = re.findall(r"^rank (\d)/2 on \S+ \(Slurm node (n\d)\): cpu, gloo, (\d+) threads$", train_log, re.M)
    ranks, nodes, threads = (sorted(column) for column in zip(*placed)) if placed else ([], [], [])
    assert (ranks, nodes, threads) == (["0", "1"], ["n1", "n2"], ["2", "2"]), train_log[-3000:]
    two_nodes = full_trainer_state(run)["model"]
    one_process = full_trainer_state(smoke / "runs" / "sft")["model"]
    init = load_file(smoke / "models" / "student" / "model.safetensors")
    assert two_nodes.keys() == one_process.keys()
    for name, weight in one_process.items():
        moved = (weight - init[name].float()).abs().max()
        assert (weight - two_nodes[name]).abs().max() <= 1e-5 + 1e-3 * moved, name


def test_a_job_granted_gpus_that_torch_cannot_use_stops_with_the_reason(cluster):
    """What a GPU node with an old driver or a CPU torch looks like to a job: Slurm's grant, no CUDA.
    The device choice every job makes (opdgeom.device) must refuse it, and a job without GPUs is not
    affected."""
    env = {k: v for k, v in os.environ.items() if k != "OPDGEOM_DEVICE"}
    env["PYTHONPATH"] = str(REPO / "src")
    check = [sys.executable, "-m", "opdgeom.device"]
    on_gpus = subprocess.run(["srun", "-p", "gpu", "--gpus=h100:1", *check], env=env, capture_output=True, text=True)
    assert on_gpus.returncode != 0, on_gpus.stdout
    assert "a GPU was expected (Slurm granted this job GPUs (SLURM_" in on_gpus.stderr, on_gpus.stderr
    assert "torch.version.cuda=None" in on_gpus.stderr and "OPDGEOM_DEVICE=cpu" in on_gpus.stderr
    on_cpus = subprocess.run(["srun", "-p", "cpu", *check], env=env, capture_output=True, text=True)
    assert (on_cpus.returncode, on_cpus.stdout.strip()) == (0, "cpu"), on_cpus.stderr
