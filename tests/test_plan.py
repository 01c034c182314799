"""Training recipes (issue 27): SFT's anchor recipe lives in one place that a family can rescale."""

import copy

import pytest
import yaml

from opdgeom.config import ConfigError
from opdgeom.plan import Study

from conftest import REPO

SFT_RUNS = ["sft.s0", "sft.s1", "sft.s2", "sft.projgrad", "sft.projupdate", "sft.student_alt", "sft.programs"]


def base_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def study(config: dict) -> Study:
    return Study.from_config(config, REPO / "config" / "families", REPO / "workflow" / "schemas")


def anchor(spec) -> tuple:
    t = spec.train
    return (t.steps, t.batch_size, t.lr, t.warmup_steps, t.checkpoint_every)


def test_every_sft_run_names_the_anchor_recipe():
    for entry in base_config()["runs"]:
        if entry["method"] == "sft":
            assert entry.get("recipe") == "anchor" and "train" not in entry, entry["name"]


def test_tiny_default_resolves_as_before():
    s = study(base_config())
    for run in SFT_RUNS:
        assert anchor(s.runs[run]) == (800, 32, 3.0e-3, 20, 200), run
    t = s.runs["sft.s0"].train
    assert (t.weight_decay, t.grad_clip, t.group_size, t.max_new_tokens) == (0.0, 1.0, 4, 40)
    assert anchor(s.runs["opd.s0"]) == (60, 16, 2.5e-5, 5, 20)  # no recipe: the train defaults


@pytest.mark.parametrize("family", ["qwen3-8b", "llama3-8b"])
def test_hub_family_sft_takes_the_preset_recipe(family):
    config = base_config()
    config["family"] = family
    s = study(config)
    for run in SFT_RUNS:
        assert anchor(s.runs[run]) == (625, 64, 1.0e-5, 19, 125), run
        assert s.runs[run].train.lr != 3.0e-3
    assert s.runs["sft.s0"].train.rollout_engine == "vllm"  # the family's train still applies
    assert anchor(s.runs["opd.s0"]) == (200, 64, 1.0e-6, 10, 20)


def test_pilot_has_its_own_anchor_length():
    config = base_config()
    config["family"] = "qwen3-pilot"
    s = study(config)
    for run in SFT_RUNS:
        assert anchor(s.runs[run]) == (125, 64, 1.0e-5, 4, 40), run


def test_hub_presets_train_sft_on_demonstrations_and_the_others_on_prompts():
    """The shared reasoning-math data: SFT runs read the domain's sft.jsonl (verified long-CoT traces),
    policy-gradient runs its train.jsonl (DeepScaleR prompts); the pilot's overrides deep-merge over the
    included file; the data rule gets the student's tokenizer for the 8192-token length filter."""
    config = base_config()
    config["family"] = "qwen3-8b"
    s = study(config)
    assert s.data["domain"] == "competition_math" and s.runs["sft.s0"].domain == "competition_math"
    assert s.train_data(s.runs["sft.s0"]).name == "sft.jsonl" and s.train_data(s.runs["opd.s0"]).name == "train.jsonl"
    roles = s.data_sources("competition_math")
    assert set(roles) == {"sft", "prompts"} and roles["sft"]["dataset"] == "open-r1/OpenR1-Math-220k"
    assert roles["prompts"]["dataset"] == "agentica-org/DeepScaleR-Preview-Dataset"
    assert set(s.data_sources("mbpp")) == {"train", "eval"} and s.data_sources("math") is None
    assert s.data_tokenizer("competition_math") == s.model_dir("student") and s.data_tokenizer("mbpp") is None
    assert s.runs["opd.s0"].train.max_new_tokens == 8192 and s.runs["opd.s0"].train.kv_cache_gb == 24
    config["family"] = "qwen3-pilot"
    pilot = study(config)
    sft = pilot.data_sources("competition_math")["sft"]
    assert sft["max_tokens"] == 4096 and sft["mapper"] == "verified_trace"  # overridden key, kept others
    assert pilot.benchmarks["aime24"].k == 16 and pilot.benchmarks["aime24"].max_new_tokens == 4096


def test_unknown_recipe_is_refused_with_the_known_names():
    config = copy.deepcopy(base_config())
    config["runs"][0]["recipe"] = "anchr"
    with pytest.raises(ConfigError, match=r"config: runs\[0\]\.recipe: unknown recipe 'anchr'; known recipes: anchor"):
        study(config)


def test_family_override_wins_over_config_and_run_train_wins_over_both():
    config = copy.deepcopy(base_config())
    config["family_overrides"] = {"recipes": {"anchor": {"lr": 1.0e-4}, "short": {"steps": 100}}}
    config["runs"][0]["train"] = {"steps": 400}
    config["runs"].append({"name": "sft.short", "method": "sft", "init": "student", "recipe": "short"})
    s = study(config)
    assert anchor(s.runs["sft.s0"]) == (400, 32, 1.0e-4, 20, 200)  # run train > family > config recipe
    assert anchor(s.runs["sft.projgrad"]) == (800, 32, 1.0e-4, 20, 200)
    assert anchor(s.runs["sft.short"]) == (100, 16, 2.5e-5, 5, 20)  # a family-only recipe


def test_recipe_keys_are_validated():
    config = copy.deepcopy(base_config())
    config["recipes"]["anchor"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"recipes\.anchor\.lr"):
        study(config)
    config = copy.deepcopy(base_config())
    config["recipes"]["anchor"]["colour"] = 1
    with pytest.raises(ConfigError, match="'colour' was unexpected"):
        study(config)


def test_tracker_and_monitor_flags_follow_the_config():
    s = study(base_config())
    assert s.watch_flags() == "--tracker none --tracker-project opdgeom --wandb-mode offline"
    assert s.eval_tracker_flags("opd.s0") == ""
    config = copy.deepcopy(base_config())
    config["tracker"] = {"kind": "wandb", "project": "p", "wandb_mode": "offline"}
    config["monitor"] = {"every": 10, "k": 8}
    s = study(config)
    assert (
        s.watch_flags() == "--tracker wandb --tracker-project p --wandb-mode offline --monitor-every 10 --monitor-k 8"
    )
    assert s.eval_tracker_flags("opd.s0").endswith(f"--tracker-dir {s.run_dir('opd.s0')}")
    assert s.eval_tracker_flags("teacher").endswith(f"--tracker-dir {s.results / 'eval' / 'tracker' / 'teacher'}")
    config["tracker"]["kind"] = "mlflow"
    with pytest.raises(ConfigError, match="tracker"):
        study(config)


def test_hub_families_run_the_programs_variant_on_the_real_code_domain():
    for family in ("qwen3-8b", "llama3-8b", "qwen3-pilot"):
        config = copy.deepcopy(base_config())
        config["family"] = family
        s = study(config)
        assert {s.runs[r].domain for r in ("sft.programs", "opd.programs")} == {"mbpp"}, family
        assert "mbpp" in s.domains and "programs" not in s.domains
    tiny = study(base_config())
    assert tiny.runs["opd.programs"].domain == "programs"


def test_hub_presets_score_every_reference_on_their_benchmarks():
    config = copy.deepcopy(base_config())
    config["family"] = "qwen3-8b"
    s = study(config)
    aime = s.benchmarks["aime24"]
    assert (aime.k, aime.temperature, aime.top_p, aime.max_new_tokens) == (16, 0.6, 0.95, 8192)
    assert s.benchmarks["math500"].k == 1 and s.benchmark_source("math500")["dataset"] == "HuggingFaceH4/MATH-500"
    spec = s.figures["fig6_aime24"]
    assert spec.kind == "fig6" and spec.stem == "fig6.aime24" and spec.options["domain"] == "competition_math"
    inputs = s.figure_inputs("fig6_aime24")
    assert inputs and all(p.parent == s.results / "eval" / "bench" / "aime24" for p in inputs)
    assert s.figure_inputs("fig6") == [
        s.eval_table(r) for r in dict.fromkeys([*s.figures["fig6"].runs, *s.reference_refs])
    ]
    assert "fig6_aime24" not in study(base_config()).figures  # the tiny family has no benchmarks
    config["family_overrides"] = {"benchmarks": {"bad": {"source": "nowhere", "domain": "gsm8k", "max_new_tokens": 8}}}
    with pytest.raises(ConfigError, match=r"benchmarks\.bad\.source: 'nowhere' is not in the family's sources"):
        study(config)
