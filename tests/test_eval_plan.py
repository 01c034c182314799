"""The evaluate job's memory plan (issue 27, defect 3): the phased evaluation of every hub preset fits
its GPUs, the planner refuses a study whose evaluate jobs would not, and the plan's phases are those
``evaluate.checkpoint_metrics`` runs (never two large models at once)."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from opdgeom.cli import main as cli_main
from opdgeom.config import ConfigError, deep_merge
from opdgeom.plan import Study
from opdgeom.train.eval_plan import EVAL_PHASES, check_evaluate_fits, eval_plan
from opdgeom.train.memory_plan import BF16, load_family_preset, shape_of, sharded

from conftest import REPO


def config_for(family: str, **evaluate) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["family"] = family
    if evaluate:
        config["family_overrides"] = {"evaluate": evaluate}
    return config


def resolved(family: str, **evaluate) -> dict:
    preset = load_family_preset(family)
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["evaluate"]
    return deep_merge(deep_merge(base, preset.get("evaluate", {})), evaluate)


def study(config: dict) -> Study:
    return Study.from_config(config, REPO / "config" / "families", REPO / "workflow" / "schemas")


@pytest.mark.parametrize("family, gpus", [("qwen3-8b", 1), ("llama3-8b", 3), ("qwen3-pilot", 1)])
def test_every_hub_preset_evaluates_within_its_gpus(family, gpus):
    result = check_evaluate_fits(load_family_preset(family), resolved(family), 80)
    assert result.gpus == gpus and result.phases == EVAL_PHASES
    assert result.peak_bytes <= 0.9 * 80e9


def test_no_phase_holds_the_teacher_beside_the_student_or_the_engine():
    """What ran out of memory before: teacher (65.5 GB) + student (16.4 GB) + an engine, at once."""
    family = load_family_preset("qwen3-8b")
    result = eval_plan(family, resolved("qwen3-8b"), 80)
    t_params = sharded(shape_of(family["models"]["teacher"]), 1).params
    by_name = {c.name: c for c in result.components}
    assert by_name["teacher weights"].bytes == BF16 * t_params and by_name["teacher weights"].phases == ("teacher",)
    for name in ("engine weights", "engine kv cache", "student weights"):
        assert "teacher" not in by_name[name].phases, name
    assert BF16 * t_params + by_name["student weights"].bytes + by_name["engine kv cache"].bytes > 80e9  # the old way


def test_the_planner_refuses_a_study_whose_evaluate_jobs_do_not_fit():
    # The 70B teacher on one GPU: 141 GB of weights alone.
    with pytest.raises(ConfigError, match=r"config: family llama3-8b: evaluate: .* does not fit 1 x 80 GB: .*teacher"):
        study(config_for("llama3-8b", gpus=1))
    # Teacher-forced passes of the whole batch (256 x 1024 tokens) beside the 32B teacher.
    with pytest.raises(ConfigError, match=r"qwen3-8b: evaluate: .*teacher phase: .*teacher pass"):
        study(config_for("qwen3-8b", score_tokens=262144))
    assert study(config_for("qwen3-8b")).eval_budget_flags() == "--score-tokens 8192 --kv-cache-gb 40"


def test_a_larger_gpu_count_spreads_the_teacher():
    family, settings = load_family_preset("llama3-8b"), resolved("llama3-8b")
    three, six = eval_plan(family, settings, 80), eval_plan(family, {**settings, "gpus": 6}, 80)
    weights = {r.gpus: next(c.bytes for c in r.components if c.name == "teacher weights") for r in (three, six)}
    assert weights[3] == pytest.approx(2 * weights[6], abs=1)


def test_cli_prints_the_evaluate_plan(capsys):
    assert cli_main(["memory-plan", "--family", "qwen3-8b", "--gpu-mem-gb", "80", "--evaluate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and set(out["phase_bytes"]) == set(EVAL_PHASES) and out["gpus"] == 1
    assert cli_main(["memory-plan", "--family", "qwen3-8b", "--gpu-mem-gb", "40", "--evaluate"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_the_gpu_hours_estimate_counts_the_runs_the_planner_expands(repo):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_hours.py", "--family", "qwen3-8b"], cwd=repo, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    runs = len(study(config_for("qwen3-8b")).runs)
    assert f"{runs} runs" in proc.stdout and runs == 27
    counts = re.findall(r"^\| (SFT[^|]*|OPD[^|]*) \| [\d.]+ \| (\d+) \|", proc.stdout, re.M)
    assert sum(int(n) for _, n in counts) == runs
