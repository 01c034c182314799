"""The typed run spec: what the plan builds is what `opdgeom train` receives, field for field."""

import json

import pytest
import yaml

from opdgeom.plan import Study
from opdgeom.spec import Behaviour, Projection, RunSpec, SpecError, TokenMask, TrainSettings

from conftest import REPO

SETTINGS = {
    "steps": 6, "batch_size": 4, "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 1, "grad_clip": 1.0,
    "checkpoint_every": 4, "max_new_tokens": 8, "temperature": 1.0, "group_size": 2,
}  # fmt: skip


def full_spec() -> RunSpec:
    return RunSpec(
        name="opd.x", method="mix", init="sft", domain="math", teacher="teacher",
        train=TrainSettings(**SETTINGS, rho_clip=10.0, micro_batch_tokens=256), alpha=0.25,
        token_mask=TokenMask("top", 0.5), behaviour=Behaviour("lagged", 4),
        projection=Projection("update", 16, "opd", 0.2),
    )  # fmt: skip


def test_round_trip_through_json_keeps_every_field():
    spec = full_spec()
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    bare = RunSpec("sft", "sft", "student", "math", None, TrainSettings(**SETTINGS))
    assert RunSpec.from_json(bare.to_json()) == bare
    assert "teacher" not in bare.to_json() and "rho_clip" not in bare.to_json()["train"]


def test_checkpoint_steps_include_the_last_step():
    assert TrainSettings(**SETTINGS).checkpoint_steps == [4, 6]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["train"].update(chekpoint_every=3), r"--spec\.train: unknown key\(s\) \['chekpoint_every'\]"),
        (lambda d: d["train"].pop("lr"), r"--spec\.train: missing key\(s\) \['lr'\]"),
        (lambda d: d["behaviour"].update(lagg=2), r"--spec\.behaviour: unknown key\(s\) \['lagg'\]"),
        (lambda d: d.update(method="dpo"), r"--spec\.method: unknown method 'dpo'"),
        (lambda d: d.update(colour="blue"), r"--spec: unknown key\(s\) \['colour'\]"),
        (
            lambda d: d["train"].update(rollout_engine="vllm", teacher_engine="vllm"),
            r"--spec\.train: rollout_engine vllm with teacher_engine vllm",
        ),
    ],
)
def test_a_malformed_spec_names_the_key(mutate, message):
    data = full_spec().to_json()
    mutate(data)
    with pytest.raises(SpecError, match=message):
        RunSpec.from_json(data, where="--spec")


def test_every_planned_run_reaches_the_trainer_as_the_object_the_plan_built():
    study = Study.from_config(
        yaml.safe_load((REPO / "config/config.yaml").read_text()),
        families_dir=REPO / "config/families",
        schema_dir=REPO / "workflow/schemas",
    )
    for name, spec in study.runs.items():
        assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec, name
        assert isinstance(spec.train, TrainSettings)


def test_a_new_train_option_in_the_schema_but_not_the_dataclass_fails_at_planning(tmp_path):
    """Adding an option is schema + dataclass: a schema-only option stops the plan, naming it."""
    import shutil

    schemas = tmp_path / "schemas"
    shutil.copytree(REPO / "workflow/schemas", schemas)
    schema = yaml.safe_load((schemas / "config.schema.yaml").read_text())
    schema["$defs"]["train"]["properties"]["label_smoothing"] = {"type": "number"}
    (schemas / "config.schema.yaml").write_text(yaml.safe_dump(schema))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["train"]["label_smoothing"] = 0.1
    with pytest.raises(SpecError, match=r"runs\[0\]\.train: unknown key\(s\) \['label_smoothing'\]"):
        Study.from_config(config, families_dir=REPO / "config/families", schema_dir=schemas)
