"""tasks.sources / tasks.fetch without network: typed sources, field paths, length filtering, the three
offline layouts (JSONL mirror, hub snapshot cache, datasets arrow cache) with their revision pins, the
missing-source error, and fetch-data with the network monkeypatched."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest

from opdgeom.tasks import fetch as fetch_module
from opdgeom.tasks.base import Example
from opdgeom.tasks.fetch import add_fetch_parser, fetch_sources, write_mirror
from opdgeom.tasks.sources import (
    RevisionMismatch,
    Source,
    SourceError,
    SourceNotFound,
    field_mapper,
    load_source,
    mirror_path,
    read_field,
    revision_path,
)
from opdgeom.tokenizer import build_char_tokenizer

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
FIELDS = {"prompt": "problem", "completion": "messages.1.content", "answer": "answer"}


def record(i: int) -> dict:
    problem = f"What is {i} + {i}?"
    solution = "x" * (10 * i) + f" so the answer is \\boxed{{{2 * i}}}"
    return {
        "problem": problem,
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}],
        "answer": str(2 * i),
        "meta": {"level": i, "tags": ["algebra", "easy"]},
    }


ROWS = [record(i) for i in range(5)]


def source(**kw) -> Source:
    data = {"dataset": "org/math-set", "split": "train", "fields": FIELDS, **kw}
    return Source.from_dict(data, "test: sources.sft")


@pytest.fixture
def dirs(tmp_path):
    """An empty hub cache and datasets cache, passed explicitly (never the user's)."""
    (tmp_path / "hub").mkdir()
    (tmp_path / "datasets").mkdir()
    return {"hub_cache": tmp_path / "hub", "cache_dir": tmp_path / "datasets"}


def write_snapshot(hub: Path, dataset: str, sha: str, rows: list[dict], main: bool = True) -> Path:
    """The hub cache layout `hf download REPO --repo-type dataset` leaves (parquet under data/)."""
    repo = hub / f"datasets--{dataset.replace('/', '--')}"
    data = repo / "snapshots" / sha / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(data / "train-00000-of-00001.parquet"))
    if main:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha)
    return repo


def write_arrow_cache(cache: Path, dataset: str, sha: str, rows: list[dict], tmp: Path) -> Path:
    """The datasets cache layout an online `load_dataset(REPO)` leaves: org___name/default/0.0.0/<sha>/
    with dataset_info.json and <name>-train.arrow, built by the json builder and moved into place."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    org, name = dataset.split("/")
    src = tmp / f"{name}-{sha[:6]}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(
        cache_dir=str(tmp / "build"), dataset_name=name, config_name="default", hash=sha, data_files={"train": str(src)}
    )
    builder.download_and_prepare()
    dest = cache / f"{org}___{camelcase_to_snakecase(name)}" / "default" / "0.0.0" / sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, dest)
    return dest


# --- typed sources and fields -------------------------------------------------------------------


def test_from_dict_names_where_and_key():
    s = source(revision=SHA, limit=3, max_tokens=100)
    assert (s.dataset, s.config, s.split, s.revision, s.limit, s.max_tokens) == (
        "org/math-set",
        None,
        "train",
        SHA,
        3,
        100,
    )
    with pytest.raises(SourceError, match=r"test: unknown key\(s\) \['splits'\]"):
        Source.from_dict({"dataset": "a/b", "splits": "train"}, "test")
    with pytest.raises(SourceError, match=r"test: missing key\(s\) \['split'\]"):
        Source.from_dict({"dataset": "a/b"}, "test")
    with pytest.raises(SourceError, match=r"test\.limit: expected a positive integer"):
        Source.from_dict({"dataset": "a/b", "split": "t", "fields": {"prompt": "p"}, "limit": 0}, "test")
    with pytest.raises(SourceError, match=r"test\.dataset: expected a hub id"):
        Source.from_dict({"dataset": "gsm8k", "split": "t"}, "test")
    with pytest.raises(SourceError, match=r"test\.fields\.answer: expected a dotted record path"):
        Source.from_dict({"dataset": "a/b", "split": "t", "fields": {"prompt": "p", "answer": "a..b"}}, "test")
    with pytest.raises(SourceError, match=r"test\.fields: missing key 'prompt'"):
        Source.from_dict({"dataset": "a/b", "split": "t", "fields": {"answer": "a"}}, "test")
    with pytest.raises(SourceError, match=r"test\.mapper: unknown mapper 'nope'"):
        Source.from_dict({"dataset": "a/b", "split": "t", "mapper": "nope"}, "test")


def test_read_field_dotted_and_indexed():
    r = ROWS[2]
    assert read_field(r, "messages.1.content") == r["messages"][1]["content"]
    assert read_field(r, "messages.-1.role") == "assistant"
    assert read_field(r, "meta.tags.0") == "algebra"
    with pytest.raises(KeyError, match=r"'solution'.*no key 'solution' in the record \(its keys: problem, messages"):
        read_field(r, "solution")
    with pytest.raises(KeyError, match=r"'meta\.levels'.*no key 'levels' in meta \(its keys: level, tags\)"):
        read_field(r, "meta.levels")
    with pytest.raises(KeyError, match=r"index 5 out of range \(messages has 2 items\)"):
        read_field(r, "messages.5.content")
    with pytest.raises(KeyError, match=r"'problem\.x'.*problem is a str"):
        read_field(r, "problem.x")


def test_field_mapper_prompt_only_and_gsm8k_adapter(tmp_path, dirs):
    example = field_mapper(source())(ROWS[1])
    assert example == Example("What is 1 + 1?", ROWS[1]["messages"][1]["content"], "2")
    fields = {"prompt": "problem", "answer": "meta.level"}
    prompt_only = Source.from_dict({"dataset": "a/b", "split": "t", "fields": fields}, "t")
    assert field_mapper(prompt_only)(ROWS[3]) == Example("What is 3 + 3?", "", "3")
    # GSM8K through files.gsm8k_example (calculator annotations removed, the answer after '####')
    gsm = Source.from_dict({"dataset": "openai/gsm8k", "config": "main", "split": "test", "mapper": "gsm8k"}, "t")
    rows = [{"question": "Tom has 2 + 3 apples?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}]
    write_mirror(rows, mirror_path(gsm, tmp_path / "mirror"), SHA)
    loaded = load_source(gsm, mirror_dir=tmp_path / "mirror", **dirs)
    out, dropped = loaded.examples, loaded.too_long
    assert out == [Example("Q: Tom has 2 + 3 apples?\nA: ", "2 + 3 = 5\n#### 5", "5")] and dropped == 0


# --- offline layouts ------------------------------------------------------------------------------


def test_jsonl_mirror_load_limit_and_length_filter(tmp_path, dirs):
    mirror = tmp_path / "mirror"
    path = write_mirror(ROWS, mirror_path(source(), mirror), SHA)
    assert path == mirror / "org__math-set" / "default" / "train.jsonl"
    assert revision_path(path).read_text() == SHA + "\n"
    loaded = load_source(source(revision=SHA), mirror_dir=mirror, **dirs)
    examples, dropped = loaded.examples, loaded.too_long
    assert [e.answer for e in examples] == ["0", "2", "4", "6", "8"] and dropped == 0
    assert examples[1].completion == ROWS[1]["messages"][1]["content"]
    # characters: record i has len(prompt + completion) = 14 + 10 i + 23 (+1 for 2i >= 10)
    lengths = [len(r["problem"] + r["messages"][1]["content"]) for r in ROWS]
    cut = lengths[2]
    loaded = load_source(source(max_tokens=cut), mirror_dir=mirror, **dirs)
    examples, dropped = loaded.examples, loaded.too_long
    assert [e.answer for e in examples] == ["0", "2", "4"] and dropped == 2
    tok = build_char_tokenizer()
    loaded = load_source(source(max_tokens=cut), mirror_dir=mirror, tokenizer=tok, **dirs)
    examples, dropped = loaded.examples, loaded.too_long
    assert len(examples) == 3 and dropped == 2  # one token per character
    loaded = load_source(source(max_tokens=cut, limit=2), mirror_dir=mirror, **dirs)
    examples, dropped = loaded.examples, loaded.too_long
    assert [e.answer for e in examples] == ["0", "2"] and dropped == 0
    # a source whose records lack a mapped field names the path and the record
    bad = Source.from_dict({"dataset": "org/math-set", "split": "train", "fields": {"prompt": "question"}}, "t")
    with pytest.raises(KeyError, match=r"record 0: field 'question': no key 'question'"):
        load_source(bad, mirror_dir=mirror, **dirs)


def test_mirror_pin_mismatch_and_interrupted_fetch(tmp_path, dirs):
    mirror = tmp_path / "mirror"
    path = write_mirror(ROWS, mirror_path(source(), mirror), SHA)
    with pytest.raises(RevisionMismatch, match=rf"pinned revision {OTHER} but .*train.jsonl holds revision {SHA}"):
        load_source(source(revision=OTHER), mirror_dir=mirror, family="qwen3-8b", **dirs)
    revision_path(path).unlink()
    with pytest.raises(FileNotFoundError, match=r"no train.revision beside it"):
        load_source(source(), mirror_dir=mirror, **dirs)


def test_hub_snapshot_cache_offline(tmp_path, dirs):
    write_snapshot(dirs["hub_cache"], "org/math-set", SHA, ROWS)
    for revision in (None, SHA):
        loaded = load_source(source(revision=revision), **dirs)
        examples, dropped = loaded.examples, loaded.too_long
        assert [e.prompt for e in examples] == [r["problem"] for r in ROWS] and dropped == 0
    with pytest.raises(RevisionMismatch, match=rf"pinned revision {OTHER} but the hub cache .* holds revision {SHA}"):
        load_source(source(revision=OTHER), **dirs)


def test_datasets_arrow_cache_offline_pinned(tmp_path, dirs):
    write_arrow_cache(dirs["cache_dir"], "org/math-set", SHA, ROWS, tmp_path)
    examples = load_source(source(), **dirs).examples
    assert [e.answer for e in examples] == ["0", "2", "4", "6", "8"]
    # a newer cached revision does not replace the pinned one (load_dataset offline would take the newest)
    write_arrow_cache(dirs["cache_dir"], "org/math-set", OTHER, ROWS[:2], tmp_path)
    assert len(load_source(source(revision=SHA), **dirs).examples) == 5
    assert len(load_source(source(revision=OTHER), **dirs).examples) == 2
    third = "1" * 40
    with pytest.raises(
        RevisionMismatch,
        match=rf"pinned revision {third} but the datasets cache .*org___math-set holds revisions {SHA}, {OTHER}",
    ):
        load_source(source(revision=third), **dirs)


def test_pin_found_in_a_later_layout(tmp_path, dirs):
    mirror = tmp_path / "mirror"
    write_mirror(ROWS[:1], mirror_path(source(), mirror), OTHER)
    write_snapshot(dirs["hub_cache"], "org/math-set", SHA, ROWS)
    assert len(load_source(source(revision=SHA), mirror_dir=mirror, **dirs).examples) == 5


def test_nothing_present_names_the_fetch_command(tmp_path, dirs):
    with pytest.raises(SourceNotFound) as info:
        load_source(source(revision=SHA), mirror_dir=tmp_path / "mirror", family="qwen3-8b", **dirs)
    message = str(info.value)
    assert "opdgeom fetch-data --family qwen3-8b" in message
    assert f"org/math-set split train@{SHA}" in message
    assert "JSONL mirror" in message and "hub cache" in message and "datasets cache" in message


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from opdgeom.tasks.sources import Source, load_source
    s = Source.from_dict(json.loads(sys.argv[1]), "argv")
    examples = load_source(s).examples  # caches from HF_HOME, set before datasets is imported
    print(json.dumps([e.answer for e in examples]))
    """
)


def test_environment_caches_in_a_fresh_process(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE as a compute node sets them, read at import by datasets and
    huggingface_hub: the hub snapshot and the datasets cache under that HF_HOME are both found."""
    home = tmp_path / "hf"
    write_snapshot(home / "hub", "org/math-set", SHA, ROWS)
    write_arrow_cache(home / "datasets", "org/other-set", OTHER, ROWS[:3], tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPDGEOM_DATA"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for dataset, revision, expected in (("org/math-set", SHA, 5), ("org/other-set", OTHER, 3)):
        data = {"dataset": dataset, "split": "train", "revision": revision, "fields": FIELDS}
        out = subprocess.run(
            [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(data)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.splitlines()[-1]) == [str(2 * i) for i in range(expected)]


# --- fetch (network monkeypatched) ----------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, revision=None, cache_dir=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(fetch_module, "resolve_revision", lambda dataset, revision: SHA)
    return calls


def test_fetch_writes_mirror_and_revision_read_back_offline(tmp_path, dirs, fake_hub):
    mirror = tmp_path / "mirror"
    sources = {"sft": source(), "math500": source(split="test", config="main", revision=SHA)}
    written = fetch_sources(sources, mirror)
    assert written == [mirror / "org__math-set/default/train.jsonl", mirror / "org__math-set/main/test.jsonl"]
    assert fake_hub == [("org/math-set", None, "train", SHA), ("org/math-set", "main", "test", SHA)]
    for path in written:
        assert revision_path(path).read_text().strip() == SHA
        assert [json.loads(line) for line in path.read_text().splitlines()] == ROWS
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, revision_path(path).name])
    examples = load_source(source(revision=SHA), mirror_dir=mirror, **dirs).examples
    assert len(examples) == 5
    # a current mirror is not fetched again
    fetch_sources({"sft": source()}, mirror)
    assert len(fake_hub) == 2


def test_fetch_is_atomic_when_interrupted(tmp_path, monkeypatch):
    class Broken:
        def __iter__(self):
            yield ROWS[0]
            raise ConnectionError("network dropped")

    monkeypatch.setattr(fetch_module, "resolve_revision", lambda dataset, revision: SHA)
    monkeypatch.setattr(fetch_module, "_load_online", lambda source, revision, cache_dir: Broken())
    with pytest.raises(ConnectionError):
        fetch_sources({"sft": source()}, tmp_path / "mirror")
    folder = mirror_path(source(), tmp_path / "mirror").parent
    assert list(folder.iterdir()) == []  # no partial JSONL, no .revision, no temp file


def test_fetch_refuses_a_pin_resolving_elsewhere(tmp_path, fake_hub):
    with pytest.raises(ValueError, match=rf"sources.sft: org/math-set revision {OTHER} resolved to {SHA}"):
        fetch_sources({"sft": source(revision=OTHER)}, tmp_path / "mirror")


def test_fetch_data_cli_reads_the_family_sources(tmp_path, dirs, fake_hub):
    families = tmp_path / "families"
    (families / "shared").mkdir(parents=True)
    models = (
        "models: {student: {source: hub, repo: org/s, revision: x}, teacher: {source: hub, repo: org/t, revision: x}}"
    )
    (families / "fam.yaml").write_text(f"name: fam\ntokenizer: model\n{models}\ninclude: [shared/math.yaml]\n")
    (families / "shared" / "math.yaml").write_text(  # the sources come from the included file
        textwrap.dedent(
            """
            sources:
              sft:
                dataset: org/math-set
                split: train
                revision: null
                fields: {prompt: problem, completion: messages.1.content, answer: answer}
                max_tokens: 60
              prompts: {dataset: org/math-set, split: test, fields: {prompt: problem, answer: answer}}
            """
        )
    )
    parser = argparse.ArgumentParser()
    add_fetch_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["fetch-data", "--family", "fam", "--families-dir", str(families), "--mirror", str(tmp_path / "m")]
    )
    written = args.func(args)
    assert [p.name for p in written] == ["train.jsonl", "test.jsonl"]
    args = parser.parse_args(["fetch-data", "--family", "fam", "--families-dir", str(families), "--only", "nope"])
    with pytest.raises(SourceError, match=r"unknown source\(s\) \['nope'\]; known: sft, prompts"):
        args.func(args)
    (families / "bad.yaml").write_text(
        f"name: bad\ntokenizer: model\n{models}\nsources:\n  sft: {{dataset: org/x, split: train, field: {{}}}}\n"
    )
    args = parser.parse_args(["fetch-data", "--family", "bad", "--families-dir", str(families)])
    with pytest.raises(SourceError, match=r"bad.yaml: sources.sft: unknown key\(s\) \['field'\]"):
        args.func(args)


def test_hub_snapshot_named_config_from_the_readme(tmp_path, dirs):
    """A snapshot with several configs (gsm8k's main / socratic) is read through its README's configs."""
    repo = write_snapshot(dirs["hub_cache"], "org/two-configs", SHA, ROWS)
    snapshot = repo / "snapshots" / SHA
    shutil.move(snapshot / "data", snapshot / "main")
    (snapshot / "other").mkdir()
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(snapshot / "other" / "train-00000-of-00001.parquet"))
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train-*\n---\n"
    )
    for config, expected in (("main", 5), ("other", 1)):
        s = Source.from_dict({"dataset": "org/two-configs", "config": config, "split": "train", "fields": FIELDS}, "t")
        assert len(load_source(s, **dirs).examples) == expected


def test_rule_datas_command_reads_a_familys_pinned_sources_offline(tmp_path, monkeypatch, capsys):
    """`opdgeom data --domain mbpp --sources ... --family F` (what rule data runs for a hub family, from
    the preset's mbpp.train / mbpp.eval): MBPP records from a JSONL mirror become scorable problems; with
    nothing fetched it stops naming the fetch command and writes nothing."""
    import yaml

    from opdgeom.cli import main as cli_main
    from opdgeom.plan import Study
    from opdgeom.tasks import get_task, read_jsonl
    from opdgeom.tasks.sources import Source, mirror_path, revision_path

    from conftest import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["family"] = "qwen3-8b"
    study = Study.from_config(config, REPO / "config" / "families", REPO / "workflow" / "schemas")
    sources = study.data_sources("mbpp")

    def record(k):
        return {"task_id": k, "prompt": f"Write a function that adds {k} to the sum of two numbers.",
                "code": f"def add(a, b):\n    return a + b + {k}",
                "test_list": [f"assert add(1, 2) == {3 + k}"], "test_imports": []}  # fmt: skip

    mirror = tmp_path / "mirror"
    for role, split_records in (("train", [record(k) for k in (1, 2, 3)]), ("eval", [record(0)])):
        source = Source.from_dict(sources[role], role)
        path = mirror_path(source, mirror)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in split_records))
        revision_path(path).write_text(source.revision)
    out = tmp_path / "data"
    argv = ["data", "--domain", "mbpp", "--n-train", "2", "--n-eval", "1",
            "--train-out", str(out / "train.jsonl"), "--eval-out", str(out / "eval.jsonl"),
            "--sources", json.dumps(sources), "--family", "qwen3-8b", "--sft-out", str(out / "sft.jsonl")]  # fmt: skip
    monkeypatch.setenv("OPDGEOM_DATA_MIRROR", str(mirror))
    assert cli_main(argv) == 0
    train, held_out = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) == 2 and len(held_out) == 1 and read_jsonl(out / "sft.jsonl") == train  # one source, both roles
    assert get_task("mbpp").verify(held_out[0].completion, held_out[0].answer) == 1.0  # the reference passes
    monkeypatch.setenv("OPDGEOM_DATA_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert cli_main([*argv[:8], str(tmp_path / "none" / "train.jsonl"), *argv[9:]]) == 1
    assert "opdgeom fetch-data --family qwen3-8b" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
