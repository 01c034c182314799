"""Real data sources as typed objects, loaded offline and pinned.

A :class:`Source` names one split of a hub data set at a revision, and says where our ``Example``
fields lie in its records (dotted paths with integer indices: ``"messages.1.content"``). Compute nodes
load it without network, from the first of these that holds it:

1. a JSONL mirror written by ``opdgeom fetch-data --family F`` (``tasks.fetch``):
   ``<mirror>/<org>__<name>/<config or default>/<split>.jsonl`` with ``<split>.revision`` beside it
   (the commit SHA the records came from);
2. the hub cache that ``hf download REPO --repo-type dataset --revision REV`` fills
   (``$HF_HUB_CACHE/datasets--org--name/snapshots/<sha>/``), read by ``datasets.load_dataset`` as a
   local folder (its README's configs and data files);
3. the ``datasets`` cache that an online ``datasets.load_dataset(REPO, CONFIG)`` leaves
   (``$HF_DATASETS_CACHE/org___name/<config>/<version>/<sha>/<name>-<split>*.arrow``).

Layouts 2 and 3 are distinct in ``datasets`` 5.2.0: offline, ``load_dataset("org/name")`` never reads
the hub snapshot (it raises "Couldn't reach 'org/name' on the Hub") and reads layout 3 only, taking
the newest cached ``<sha>`` folder whatever ``revision`` asks for. So layout 3's arrow files are read
here from the pinned ``<sha>`` folder directly, and every layout checks the pin: a revision other
than the one present is an error naming both. When none holds the source, the error names the
places searched and the command that fetches it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opdgeom.config import ConfigError
from opdgeom.tasks.base import Example
from opdgeom.tasks.files import _json_lines
from opdgeom.tasks.records import MAPPERS, Mapper, SkipRecord, field_mapper, problem_path, read_field
from opdgeom.tasks.records import text as record_text

MIRROR_ENV = "OPDGEOM_DATA_MIRROR"  # the JSONL mirror folder when load_source / fetch-data get none
__all__ = ["LoadedSource", "Source", "field_mapper", "load_source", "read_field"]


class SourceError(ConfigError):
    """A source entry with a missing, unknown or ill-typed key; the message names where and which."""


class RevisionMismatch(ValueError):
    """An offline copy of a source at another revision than the pinned one; names both."""


class SourceNotFound(FileNotFoundError):
    """No offline copy of a source: the message says where it looked and how to fetch it."""


@dataclass(frozen=True)
class Source:
    """One split of a hub data set at a revision, with the record fields our examples come from.

    ``fields`` maps ``prompt``, ``completion``, ``answer`` (and any extra names a domain's mapper
    reads) to dotted record paths. ``limit``: at most this many examples (after length filtering).
    ``max_tokens``: drop examples whose prompt + completion is longer than this many tokens of the
    tokenizer given to :func:`load_source` (characters without one). ``mapper``: which record ->
    Example function (``records.MAPPERS``) the source needs when the caller does not pass its own.
    ``prompt_template``: the prompt as the model sees it, ``{prompt}`` standing for the record's
    problem statement (``records.problem_path``; e.g. an instruction to box the final answer follows
    it); lengths are measured on the templated prompt.
    """

    dataset: str
    split: str
    fields: Mapping[str, str] = field(default_factory=dict)
    config: str | None = None
    revision: str | None = None
    limit: int | None = None
    max_tokens: int | None = None
    mapper: str = "fields"
    prompt_template: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Source:
        """A source from a preset's mapping; errors name ``where`` and the offending key."""
        if not isinstance(data, dict):
            raise SourceError(f"{where}: expected a mapping, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SourceError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
        missing = [k for k in ("dataset", "split") if k not in data]
        if missing:
            raise SourceError(f"{where}: missing key(s) {missing}")
        for key in ("dataset", "split"):
            if not isinstance(data[key], str) or not data[key]:
                raise SourceError(f"{where}.{key}: expected a non-empty string, got {data[key]!r}")
        if data["dataset"].count("/") != 1:
            raise SourceError(f"{where}.dataset: expected a hub id 'org/name', got {data['dataset']!r}")
        for key in ("config", "revision"):
            if data.get(key) is not None and (not isinstance(data[key], str) or not data[key]):
                raise SourceError(f"{where}.{key}: expected a non-empty string or null, got {data[key]!r}")
        for key in ("limit", "max_tokens"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise SourceError(f"{where}.{key}: expected a positive integer or null, got {value!r}")
        fields = data.get("fields", {})
        if not isinstance(fields, dict):
            raise SourceError(f"{where}.fields: expected a mapping of field -> record path, got {fields!r}")
        for name, path in fields.items():
            if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
                raise SourceError(f"{where}.fields.{name}: expected a dotted record path, got {path!r}")
        mapper = data.get("mapper", "fields")
        if mapper not in MAPPERS:
            raise SourceError(f"{where}.mapper: unknown mapper {mapper!r}; known: {', '.join(MAPPERS)}")
        if mapper == "fields" and "prompt" not in fields:
            raise SourceError(f"{where}.fields: missing key 'prompt' (the record path of the prompt)")
        template = data.get("prompt_template")
        if template is not None:
            try:
                ok = isinstance(template, str) and "{prompt}" in template and template.format(prompt="") is not None
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise SourceError(
                    f"{where}.prompt_template: expected a string with one '{{prompt}}' and no other "
                    f"{{...}} fields (write {{{{ }}}} for a literal brace), got {template!r}"
                )
        return cls(**{**data, "fields": dict(fields)})

    def describe(self) -> str:
        config = f" (config {self.config})" if self.config else ""
        return f"{self.dataset}{config} split {self.split}@{self.revision or 'latest'}"

    def format_prompt(self, prompt: str) -> str:
        return self.prompt_template.format(prompt=prompt) if self.prompt_template else prompt


@dataclass
class LoadedSource:
    """What :func:`load_source` read: the examples (templated prompts), each one's problem statement
    as the record gives it (``problems``, aligned, at ``records.problem_path``: what decontamination
    compares), and how many records were left out and why (``too_long``: over ``max_tokens``;
    ``skipped``: reason -> count, from the mapper)."""

    source: Source
    examples: list[Example]
    problems: list[str]
    too_long: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{len(self.examples)} examples"]
        if self.too_long:
            parts.append(f"{self.too_long} dropped as longer than {self.source.max_tokens} tokens")
        parts += [f"{n} skipped: {reason}" for reason, n in sorted(self.skipped.items())]
        return f"{self.source.describe()}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Where an offline copy lies


def mirror_path(source: Source, mirror_dir: str | Path) -> Path:
    """``<mirror>/<org>__<name>/<config or default>/<split>.jsonl``."""
    return Path(mirror_dir) / source.dataset.replace("/", "__") / (source.config or "default") / f"{source.split}.jsonl"


def revision_path(jsonl: Path) -> Path:
    """The commit SHA file beside a mirror split: ``<split>.revision``."""
    return jsonl.with_suffix(".revision")


def fetch_command(family: str | None) -> str:
    return f"opdgeom fetch-data --family {family or 'FAMILY'}"


def _hub_cache(hub_cache: str | Path | None) -> Path:
    if hub_cache is not None:
        return Path(hub_cache)
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _datasets_cache(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


@contextmanager
def offline():
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the block, in the environment and in the constants
    that ``datasets`` and ``huggingface_hub`` read once at import."""
    import datasets
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pin_error(source: Source, present: str, where: str, family: str | None) -> RevisionMismatch:
    return RevisionMismatch(
        f"{source.describe()}: pinned revision {source.revision} but {where} holds "
        f"{'revisions' if ',' in present else 'revision'} {present}; "
        f"fetch the pinned one (`{fetch_command(family)}` on a login node) or change the pin"
    )


def _check_pin(source: Source, present: str, where: Path, family: str | None) -> None:
    if source.revision is not None and source.revision != present:
        raise _pin_error(source, present, str(where), family)


def _mirror_records(source: Source, mirror_dir: Path, family: str | None) -> Iterator[dict] | None:
    path = mirror_path(source, mirror_dir)
    if not path.exists():
        return None
    rev_file = revision_path(path)
    if not rev_file.exists():
        raise FileNotFoundError(f"{path}: mirror has no {rev_file.name} beside it (an interrupted fetch?)")
    _check_pin(source, rev_file.read_text().strip(), path, family)
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[dict]:
    return (record for _, record in _json_lines(path))


def _snapshot_records(source: Source, caches: tuple[Path, Path], family: str | None) -> Iterable[dict] | None:
    """Layout 2: the hub snapshot ``hf download --repo-type dataset`` leaves, loaded as a local folder
    (its arrow conversion goes to the datasets cache ``caches[1]``)."""
    hub_cache, datasets_cache = caches
    repo = hub_cache / f"datasets--{source.dataset.replace('/', '--')}"
    if not (repo / "snapshots").is_dir():
        return None
    snapshot = _snapshot_folder(repo, source.revision)
    if snapshot is None:
        present = sorted(p.name for p in (repo / "snapshots").iterdir() if p.is_dir())
        if source.revision is None or not present:
            return None
        raise _pin_error(source, ", ".join(present), f"the hub cache {repo}", family)
    import datasets

    with offline():
        return datasets.load_dataset(str(snapshot), source.config, split=source.split, cache_dir=str(datasets_cache))


def _snapshot_folder(repo: Path, revision: str | None) -> Path | None:
    ref = revision or "main"
    if (repo / "refs" / ref).is_file():
        ref = (repo / "refs" / ref).read_text().strip()
    folder = repo / "snapshots" / ref
    if folder.is_dir():
        return folder
    if revision is None:  # no refs/main: the only snapshot, if there is one
        snapshots = [p for p in (repo / "snapshots").iterdir() if p.is_dir()]
        return snapshots[0] if len(snapshots) == 1 else None
    return None


def _arrow_records(source: Source, cache_dir: Path, family: str | None) -> Iterable[dict] | None:
    """Layout 3: the ``datasets`` cache of an online ``load_dataset``, the pinned ``<sha>`` folder."""
    from datasets.naming import camelcase_to_snakecase

    org, name = source.dataset.split("/")
    root = cache_dir / f"{org}___{camelcase_to_snakecase(name)}"
    config = source.config or "default"
    folders = [Path(p) for p in glob.glob(str(root / glob.escape(config) / "*" / "*")) if os.path.isdir(p)]
    folders = [f for f in folders if _split_files(f, source.split)]
    if not folders:
        return None
    if source.revision is not None:
        pinned = [f for f in folders if f.name == source.revision]
        if not pinned:
            present = ", ".join(sorted({f.name for f in folders}))
            raise _pin_error(source, present, f"the datasets cache {root}", family)
        folders = pinned
    folder = max(folders, key=lambda f: f.stat().st_mtime)
    import datasets

    with offline():
        parts = [datasets.Dataset.from_file(str(f)) for f in _split_files(folder, source.split)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _split_files(folder: Path, split: str) -> list[Path]:
    """``<name>-<split>.arrow`` or its shards ``<name>-<split>-00000-of-00002.arrow``, in order."""
    whole = sorted(folder.glob(f"*-{split}.arrow"))
    return whole or sorted(folder.glob(f"*-{split}-[0-9]*-of-[0-9]*.arrow"))


# ---------------------------------------------------------------------------------------------------
# Loading


def load_source(
    source: Source,
    mapper: Mapper | None = None,
    cache_dir: str | Path | None = None,
    mirror_dir: str | Path | None = None,
    tokenizer=None,
    hub_cache: str | Path | None = None,
    family: str | None = None,
) -> LoadedSource:
    """The source's examples, and what was left out (:class:`LoadedSource`); never touches the network.

    ``mapper``: record -> Example (default: the source's ``mapper`` by name, ``field_mapper``).
    ``cache_dir``: the ``datasets`` cache (default ``$HF_DATASETS_CACHE``); ``hub_cache``: the hub
    cache (default ``$HF_HUB_CACHE``); ``mirror_dir``: the JSONL mirror (default
    ``$OPDGEOM_DATA_MIRROR``), searched first. ``tokenizer``: measures ``max_tokens`` (characters
    without one). ``family``: named in the fetch command of the error.
    """
    mapper = mapper or MAPPERS[source.mapper](source)
    mirror_dir = mirror_dir if mirror_dir is not None else os.environ.get(MIRROR_ENV) or None
    layouts = []
    if mirror_dir is not None:
        layouts.append((f"JSONL mirror {mirror_path(source, mirror_dir)}", _mirror_records, Path(mirror_dir)))
    hub, cache = _hub_cache(hub_cache), _datasets_cache(cache_dir)
    snapshot_root = hub / ("datasets--" + source.dataset.replace("/", "--"))
    layouts.append((f"hub cache {snapshot_root}", _snapshot_records, (hub, cache)))
    layouts.append((f"datasets cache {cache}", _arrow_records, cache))
    mismatches = []
    for _, read, root in layouts:
        try:
            records = read(source, root, family)
        except RevisionMismatch as error:  # another layout may hold the pinned revision
            mismatches.append(error)
            continue
        if records is not None:
            return _examples(records, mapper, source, tokenizer)
    if mismatches:
        raise mismatches[0]
    raise SourceNotFound(
        f"{source.describe()} is not available offline; searched: {'; '.join(w for w, _, _ in layouts)}. "
        f"On a login node with network access (same HF_HOME / mirror folder), run\n"
        f"  {fetch_command(family)}\nthen rerun here."
    )


def _examples(records: Iterable[Mapping], mapper: Mapper, source: Source, tokenizer) -> LoadedSource:
    loaded = LoadedSource(source, [], [])
    problem_at = problem_path(source)
    for index, record in enumerate(records):
        if source.limit is not None and len(loaded.examples) >= source.limit:
            break
        try:
            example = mapper(record)
        except SkipRecord as skip:
            loaded.skipped[str(skip)] = loaded.skipped.get(str(skip), 0) + 1
            continue
        except (KeyError, ValueError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise type(error)(f"{source.describe()}: record {index}: {message}") from None
        problem = record_text(read_field(record, problem_at))
        if source.prompt_template:  # the template wraps the statement, not a mapper's own prompt form
            example = dataclasses.replace(example, prompt=source.format_prompt(problem))
        if source.max_tokens is not None and length(example, tokenizer) > source.max_tokens:
            loaded.too_long += 1
            continue
        loaded.examples.append(example)
        loaded.problems.append(problem)
    return loaded


def length(example: Example, tokenizer=None) -> int:
    """Prompt + completion in tokens of ``tokenizer`` (no special tokens), or in characters."""
    text = example.prompt + example.completion
    if tokenizer is None:
        return len(text)
    return len(tokenizer.encode(text, add_special_tokens=False))
