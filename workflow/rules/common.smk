# Target and input functions only: what to build comes from the package's study plan.
import json
import os
import shlex
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from opdgeom.launch import launch_command
from opdgeom.plan import Study

STUDY = Study.from_config(
    config,
    families_dir=Path(workflow.basedir) / "config" / "families",
    schema_dir=Path(workflow.basedir) / "workflow" / "schemas",
)
# Every rule calls the package CLI from this checkout, whatever environment runs the job
# (the project venv, a per-rule conda env, a Slurm node).
shell.prefix(f"export PYTHONPATH={shlex.quote(str(Path(workflow.basedir) / 'src'))}; ")
RES = str(STUDY.results)
LOGS = f"{RES}/logs"
CACHE = str(STUDY.cache_dir)
DIAGNOSE = STUDY.diagnose
RUNS = list(STUDY.runs)
TRAIN_RESOURCES = STUDY.train_resources.job_resources()


wildcard_constraints:
    run="[a-z0-9][a-z0-9_.]*",
    model="[a-z0-9][a-z0-9_]*",
    domain="[a-z0-9_]+",
    ref="[a-z0-9][a-z0-9_.]*",


def model_spec(wildcards):
    return json.dumps(STUDY.models[wildcards.model])


def model_inputs(wildcards):
    if STUDY.models[wildcards.model]["source"] == "hub":
        return {}
    return {"tokenizer": str(STUDY.tokenizer_dir), "corpus": str(STUDY.pretrain_corpus)}


def run_inputs(wildcards):
    spec = STUDY.runs[wildcards.run]
    inputs = {"init": str(STUDY.ref_marker(spec.init)), "train_data": str(STUDY.train_data(spec))}
    if spec.teacher:
        inputs["teacher"] = str(STUDY.ref_marker(STUDY.teacher_ref(spec.teacher, spec.domain)))
    if spec.projection:
        inputs["basis"] = str(STUDY.basis_file(wildcards.run))
    return inputs


# Software. Each job's conda env is pinned in envs/; profiles/slurm deploys them
# (software-deployment-method conda), the local profile runs every job in the calling environment.
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def env_file(name):
    """A conda env as `conda:` takes it: relative to workflow/rules, where every rule is defined (the same
    path as the rules that name theirs literally, so Snakemake sees one env, not two)."""
    return f"../../envs/{name}"


def train_env(wildcards):
    """vLLM rollouts need the vLLM environment (its own transformers pin); other runs the training one."""
    vllm = STUDY.runs[wildcards.run].train.rollout_engine == "vllm"
    return env_file("vllm-gpu.yaml" if vllm else "train.yaml")


def eval_env(wildcards):
    return env_file("vllm-gpu.yaml" if STUDY.evaluate.get("engine", "hf") == "vllm" else "train.yaml")


def software(env):
    """A job's first log line, shown by `snakemake -n -p`: the environment its command runs in."""
    name = os.path.normpath(os.path.join("workflow", "rules", env))
    if CONDA:
        return f"software: conda env {name}"
    return f"software: python on PATH ({name} is deployed only with --software-deployment-method conda)"


def run_flags(wildcards):
    """Paths the train command needs beyond its inputs (a run's final checkpoint is inside its folder)."""
    spec = STUDY.runs[wildcards.run]
    flags = f"--init {STUDY.ref_path(spec.init)}"
    if spec.teacher:
        flags += f" --teacher {STUDY.ref_path(STUDY.teacher_ref(spec.teacher, spec.domain))}"
    if spec.projection:
        flags += f" --projection-basis {STUDY.basis_file(wildcards.run)}"
    return flags


def data_source_flags(wildcards):
    """A real domain's pinned sources by role, the benchmarks its training data is decontaminated
    against, and the tokenizer its length filter counts in; "" for a synthetic or built-in domain."""
    sources = STUDY.data_sources(wildcards.domain)
    if sources is None:
        return ""
    flags = f"--sources {shlex.quote(json.dumps(sources))} --family {STUDY.name}"
    benchmarks = {name: STUDY.benchmark_source(name) for name in STUDY.benchmarks}
    if benchmarks:
        flags += f" --benchmarks {shlex.quote(json.dumps(benchmarks))}"
    tokenizer = STUDY.data_tokenizer(wildcards.domain)
    return flags + (f" --tokenizer {tokenizer}" if tokenizer else "")


def data_inputs(wildcards):
    """The student's tokenizer when the domain's length filter counts its tokens (built, or downloaded)."""
    tokenizer = STUDY.data_tokenizer(wildcards.domain)
    if tokenizer is None:
        return {}
    if tokenizer == STUDY.tokenizer_dir:
        return {"tokenizer": str(tokenizer)}
    return {"tokenizer": str(STUDY.ref_marker("student"))}


def watch_flags():
    return STUDY.watch_flags()


def eval_budget_flags():
    return STUDY.eval_budget_flags()


def eval_domain(ref):
    return STUDY.runs[ref].domain if ref in STUDY.runs else STUDY.data["domain"]


def eval_teacher(ref):
    """The teacher a reference's reverse KL is measured to: a run's own, else the domain's default."""
    spec = STUDY.runs.get(ref)
    return STUDY.teacher_ref(spec.teacher if spec and spec.teacher else "teacher", eval_domain(ref))


def eval_inputs(wildcards):
    return {
        "model": str(STUDY.ref_marker(wildcards.ref)),
        "eval_data": str(STUDY.data_file(eval_domain(wildcards.ref), "eval")),
        "teacher": str(STUDY.ref_marker(eval_teacher(wildcards.ref))),
    }


def eval_source(wildcards):
    if wildcards.ref in STUDY.runs:
        return f"--manifest {STUDY.manifest(wildcards.ref)}"
    return f"--model {STUDY.model_dir(wildcards.ref)}"


def all_targets():
    targets = [str(f) for name in STUDY.figures for f in STUDY.figure_outputs(name)]
    targets += [str(STUDY.eval_table(ref)) for ref in STUDY.eval_refs]
    targets += [str(STUDY.benchmark_table(b, ref)) for b in STUDY.benchmarks for ref in STUDY.eval_refs]
    targets += [str(STUDY.trajectory_table(run)) for run in STUDY.study_runs]
    return targets
