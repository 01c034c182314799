"""Bad configuration stops the workflow before any job, with a message that names the key."""

import copy
import subprocess
import sys

import pytest
import yaml

from opdgeom.config import ConfigError
from opdgeom.plan import Study

from conftest import REPO


def base_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def study(config: dict) -> Study:
    return Study.from_config(config, REPO / "config" / "families", REPO / "workflow" / "schemas")


def with_runs(*runs) -> dict:
    config = base_config()
    config["runs"] = list(runs)
    config["figures"] = [{"name": "table1"}]  # the default figures name runs these tests replace
    return config


def test_default_config_plans_the_study():
    s = study(base_config())
    assert "sft.s0" in s.runs and "teacher.math" in s.runs  # sft has seeds: sft.s0, sft.s1, sft.s2
    assert s.runs["teacher.math"].init == "teacher" and s.runs["sft.s0"].init == "student"
    assert s.runs["sft.s0"].checkpoint_steps[-1] == s.runs["sft.s0"].train.steps


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(family="nope"), "family: unknown family 'nope'"),
        (lambda c: c.pop("seed"), "seed: required key is missing"),
        (lambda c: c["train"].pop("lr"), "train.lr: required key is missing"),
        (lambda c: c["train"].update(steps="ten"), "train.steps: 'ten' is not of type 'integer'"),
        (lambda c: c["runs"][0].update(method="dpo"), "runs[0].method"),
        (lambda c: c.update(colour="blue"), "'colour' was unexpected"),
        (lambda c: c["data"].update(domain="chess"), "data.domain: unknown domain 'chess'"),
        (lambda c: c.update(family_overrides={"pretrain": {"steps": -1}}), "pretrain.steps"),
        (
            lambda c: c.update(
                family="qwen3-8b", family_overrides={"models": {"student": {"revision": "main branch"}}}
            ),
            "models.student",
        ),
    ],
)
def test_invalid_config_names_the_key(mutate, expected):
    config = copy.deepcopy(base_config())
    mutate(config)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        study(config)


def test_unknown_run_reference_is_named():
    config = with_runs({"name": "opd", "method": "opd", "init": "sfx"})
    with pytest.raises(ConfigError, match=r"runs\[0\]\.init: unknown model or run 'sfx'"):
        study(config)


def test_unknown_teacher_is_named():
    config = with_runs({"name": "opd", "method": "opd", "init": "student", "teacher": "oracle"})
    with pytest.raises(ConfigError, match=r"runs\[0\]\.teacher: unknown model 'oracle'"):
        study(config)


def test_duplicate_and_cyclic_runs_are_rejected():
    with pytest.raises(ConfigError, match="used twice"):
        study(
            with_runs(
                {"name": "a", "method": "sft", "init": "student"}, {"name": "a", "method": "sft", "init": "student"}
            )
        )
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        study(with_runs({"name": "a", "method": "sft", "init": "b"}, {"name": "b", "method": "sft", "init": "a"}))


def test_run_overrides_merge_over_family_and_defaults():
    config = with_runs({"name": "long", "method": "sft", "init": "student", "train": {"steps": 7}})
    config["family_overrides"] = {"train": {"lr": 0.5}}
    s = study(config)
    assert s.runs["long"].train.steps == 7
    assert s.runs["long"].train.lr == 0.5
    assert s.runs["long"].train.batch_size == base_config()["train"]["batch_size"]


def test_snakemake_refuses_bad_config_before_any_job(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--config", "family=nope", f"results_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "family: unknown family 'nope'" in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())


def test_every_figure_function_has_a_plan_entry():
    from opdgeom.figures import FIGURES
    from opdgeom.plan import FIGURE_DATA

    assert set(FIGURES) == set(FIGURE_DATA)


def test_figure_with_an_unknown_run_is_named():
    config = base_config()
    config["figures"] = [{"name": "fig7a", "runs": ["opd", "opd.nope"]}]
    with pytest.raises(ConfigError, match=r"figures\[0\]: unknown run\(s\) \['opd.nope'\]"):
        study(config)


def test_figure_inputs_are_only_its_runs():
    s = study(base_config())
    inputs = [p.name for p in s.figure_inputs("fig7b")]
    assert inputs == [
        "opd.s0.parquet",
        "opd.s1.parquet",
        "opd.s2.parquet",
        "opd.offanchor.parquet",
        "opd.offlag.parquet",
    ]
    assert s.figure_options("localization")["alpha"] == base_config()["diagnose"]["alpha"]


def test_sweep_findings_take_their_own_file_name():
    """config/sweep.yaml on top of config.yaml: the sweep's findings page must not overwrite the study's."""
    config = base_config()
    config.update(yaml.safe_load((REPO / "config" / "sweep.yaml").read_text()))
    s = study(config)
    assert [p.name for p in s.figure_outputs("findings")] == ["findings_sweep.md", "findings_sweep.html"]
    assert "file" not in s.figure_options("findings")
    assert [p.name for p in study(base_config()).figure_outputs("findings")] == ["findings.md", "findings.html"]
    config["figures"][1]["file"] = "Findings sweep"
    with pytest.raises(ConfigError, match=r"figures.*file"):
        study(config)


def test_sweep_reuses_the_default_studys_runs_with_identical_specs():
    """Runs that config/sweep.yaml shares with config.yaml by name (the SFT anchor, OPD and RLVR at rung
    b2) must plan to the same spec, or one of the two studies would silently rebuild the other's files."""
    default = study(base_config())
    config = base_config()
    config.update(yaml.safe_load((REPO / "config" / "sweep.yaml").read_text()))
    sweep = study(config)
    shared = sorted(set(sweep.study_runs) & set(default.study_runs))
    assert shared == sorted(f"{m}.s{i}" for m in ("sft", "opd", "rlvr") for i in range(3))
    for run in shared:
        assert sweep.runs[run].to_json() == default.runs[run].to_json(), run
    assert len(set(sweep.figures["budget"].runs)) == 18 * 3


def test_seed_list_expands_into_replicates_with_matched_inits():
    config = with_runs(
        {"name": "sft", "method": "sft", "init": "student", "seeds": [0, 1, 2]},
        {"name": "opd", "method": "opd", "init": "sft", "seeds": [0, 1, 2]},
        {"name": "rlvr", "method": "rlvr", "init": "sft", "seeds": [1, 5]},
        {"name": "opd.ctrl", "method": "opd", "init": "sft"},
    )
    config["figures"] = [{"name": "accuracy", "runs": ["sft", "opd.ctrl"]}]
    s = study(config)
    assert [r for r in s.study_runs] == [
        "sft.s0", "sft.s1", "sft.s2", "opd.s0", "opd.s1", "opd.s2", "rlvr.s1", "rlvr.s5", "opd.ctrl",
    ]  # fmt: skip
    assert s.runs["opd.s2"].init == "sft.s2" and s.run_seed("opd.s2") == 2
    assert s.runs["rlvr.s5"].init == "sft.s0"  # no sft replicate of seed 5: the first one
    assert s.runs["opd.ctrl"].init == "sft.s0" and s.run_seed("opd.ctrl") == config["seed"]
    assert s.runs["rlvr.s1"].to_json()["seed"] == 1
    assert s.figures["accuracy"].runs == ("sft.s0", "sft.s1", "sft.s2", "opd.ctrl")


@pytest.mark.parametrize(
    "seeds, expected",
    [
        ([], r"runs\[0\].seeds"),
        ([0, 0], r"runs\[0\].seeds"),
        ([-1], r"runs\[0\].seeds"),
        ("0,1", r"runs\[0\].seeds"),
        ([0.5], r"runs\[0\].seeds"),
    ],
)
def test_empty_or_malformed_seed_list_is_a_named_config_error(seeds, expected):
    config = with_runs({"name": "sft", "method": "sft", "init": "student", "seeds": seeds})
    with pytest.raises(ConfigError, match=expected):
        study(config)
    from opdgeom.config import load_family
    from opdgeom.plan import expand_seeds

    assert load_family  # the plan itself checks too (configs built without the schema)
    with pytest.raises(ConfigError, match=expected):
        expand_seeds(config["runs"])


def test_seed_suffix_is_reserved():
    with pytest.raises(ConfigError, match=r"runs\[0\].name: 'sft.s1' ends in '.s<N>'"):
        study(with_runs({"name": "sft.s1", "method": "sft", "init": "student"}))


def test_a_hub_family_that_cannot_fit_its_gpus_is_refused_at_planning():
    config = {**base_config(), "family": "qwen3-8b"}
    study(config)  # 1 node x 8 x 80 GB: fits
    config["family_overrides"] = {"train_resources": {"gpus_per_node": 2}}
    with pytest.raises(
        ConfigError, match=r"family qwen3-8b: train_resources: .*does not fit 2 x 80 GB: peak \d+\.\d GB"
    ):
        study(config)


def test_a_family_includes_shared_files_under_its_own_keys(tmp_path):
    """include: the shared files merge in order, the family's own keys win (nested keys deep-merge);
    a missing or nested include is named."""
    from opdgeom.config import load_family

    schema = REPO / "workflow" / "schemas" / "family.schema.yaml"
    (tmp_path / "shared").mkdir()
    models = "models: {student: {source: hub, repo: o/s, revision: x}, teacher: {source: hub, repo: o/t, revision: x}}"
    (tmp_path / "shared" / "a.yaml").write_text("data: {domain: gsm8k, n_train: 10, n_eval: 2}\ndomains: {x: y}\n")
    (tmp_path / "shared" / "b.yaml").write_text("data: {n_eval: 3}\n")
    (tmp_path / "fam.yaml").write_text(
        f"name: fam\ntokenizer: model\n{models}\ninclude: [shared/a.yaml, shared/b.yaml]\ndata: {{n_train: 5}}\n"
    )
    family = load_family("fam", tmp_path, schema)
    assert family["data"] == {"domain": "gsm8k", "n_train": 5, "n_eval": 3} and family["domains"] == {"x": "y"}
    assert "include" not in family
    (tmp_path / "fam.yaml").write_text(f"name: fam\ntokenizer: model\n{models}\ninclude: [shared/c.yaml]\n")
    with pytest.raises(ConfigError, match=r"fam.yaml: include: no file .*shared/c.yaml"):
        load_family("fam", tmp_path, schema)
    (tmp_path / "shared" / "c.yaml").write_text("include: [shared/a.yaml]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: include: an included file may not include others"):
        load_family("fam", tmp_path, schema)
