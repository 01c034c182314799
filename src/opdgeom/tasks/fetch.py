"""``opdgeom fetch-data --family F``: a family's data sources, fetched on a login node, pinned.

Run where the hub is reachable, with the ``HF_HOME`` (and mirror folder) the compute nodes read.
Each source's revision is resolved to its commit SHA first (``HfApi().dataset_info``), then that
commit is loaded (``datasets.load_dataset(..., revision=SHA)``, which also fills the ``datasets``
cache at ``org___name/<config>/<version>/<SHA>/``). With ``--mirror DIR`` every split is also
written as a JSONL mirror, ``DIR/<org>__<name>/<config or default>/<split>.jsonl`` (the raw records,
one JSON object a line, written atomically) and then ``<split>.revision`` beside it (the SHA; a
mirror without it is an interrupted fetch). ``tasks.sources.load_source`` reads either offline.

The family preset's ``sources:`` section (read from the YAML file; keys as ``sources.Source``)::

    sources:
      sft:                          # a name the study refers to
        dataset: open-r1/OpenR1-Math-220k   # hub id (required)
        config: default             # or null (the data set's only / default config)
        split: train                # required
        revision: null              # a commit SHA (pinned), or null (the latest at fetch time)
        fields:                     # Example field (or a mapper's extra field) -> dotted record path
          prompt: problem
          completion: messages.1.content
          answer: answer
        limit: 20000                # or null: at most this many examples
        max_tokens: 8192            # or null: drop longer prompt + completion (student tokenizer)
        mapper: fields              # "fields" (default) or "gsm8k" (question / "... #### 72" solution)
      math500: {dataset: HuggingFaceH4/MATH-500, split: test, fields: {prompt: problem, answer: answer}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from opdgeom.io import atomic_path, write_text
from opdgeom.tasks.sources import MIRROR_ENV as DEFAULT_MIRROR_ENV
from opdgeom.tasks.sources import Source, SourceError, mirror_path, revision_path


def resolve_revision(dataset: str, revision: str | None) -> str:
    """The commit SHA a revision (a SHA, branch, tag, or None for main) names on the hub. Network."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset, revision=revision or "main").sha


def _load_online(source: Source, revision: str, cache_dir: str | Path | None):
    import datasets

    return datasets.load_dataset(
        source.dataset,
        source.config,
        split=source.split,
        revision=revision,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )


def write_mirror(records, path: Path, revision: str) -> Path:
    """The records as JSONL at ``path`` (atomically), then ``<split>.revision`` holding ``revision``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(dict(record), ensure_ascii=False, default=str) + "\n")
    write_text(revision + "\n", revision_path(path))
    return path


def fetch_sources(
    sources: dict[str, Source], mirror_dir: str | Path | None, cache_dir: str | Path | None = None
) -> list[Path]:
    """Fetch every source at its pinned revision (resolved to a SHA); return the mirror files written
    (with ``mirror_dir``) or the ``datasets`` cache files filled (without). Needs network."""
    written = []
    for name, source in sources.items():
        sha = resolve_revision(source.dataset, source.revision)
        if source.revision is not None and len(source.revision) == 40 and source.revision != sha:
            raise ValueError(f"sources.{name}: {source.dataset} revision {source.revision} resolved to {sha}")
        if mirror_dir is not None:
            path = mirror_path(source, mirror_dir)
            rev_file = revision_path(path)
            if path.exists() and rev_file.exists() and rev_file.read_text().strip() == sha:
                print(f"{name}: {source.describe()} = {sha}: mirror {path} is current", file=sys.stderr)
                written.append(path)
                continue
        rows = _load_online(source, sha, cache_dir)
        if mirror_dir is not None:
            written.append(write_mirror(rows, path, sha))
            where = f"{len(rows)} records in {path}"
        else:
            files = [Path(f["filename"]) for f in getattr(rows, "cache_files", [])]
            written.extend(files)
            where = f"{len(rows)} records in the datasets cache" + (f" ({files[0].parent})" if files else "")
        print(f"{name}: {source.describe()} = {sha}: {where}", file=sys.stderr)
    return written


def family_sources(family: dict[str, Any], where: str) -> dict[str, Source]:
    """The typed ``sources:`` section of a family preset; errors name ``where`` and the entry."""
    section = family.get("sources")
    if section is None:
        raise SourceError(f"{where}: no 'sources:' section; nothing to fetch")
    if not isinstance(section, dict) or not section:
        raise SourceError(f"{where}: sources: expected a mapping of name -> source, got {section!r}")
    return {name: Source.from_dict(entry, f"{where}: sources.{name}") for name, entry in section.items()}


def add_fetch_parser(sub) -> None:
    """The ``fetch-data`` subcommand on an argparse subparsers object."""
    p = sub.add_parser("fetch-data", help="fetch a family's data sources (pinned) into the HF cache / a JSONL mirror")
    p.add_argument("--family", required=True)
    p.add_argument("--families-dir", type=Path, default=Path("config/families"))
    p.add_argument("--schema", type=Path, default=Path("workflow/schemas/family.schema.yaml"))
    p.add_argument("--mirror", type=Path, default=None, help=f"JSONL mirror folder (default ${DEFAULT_MIRROR_ENV})")
    p.add_argument("--cache-dir", type=Path, default=None, help="the datasets cache (default $HF_DATASETS_CACHE)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="fetch only these sources")
    p.set_defaults(func=fetch_main)


def fetch_main(args) -> list[Path]:
    import os

    from opdgeom.config import load_family

    path = Path(args.families_dir) / f"{args.family}.yaml"
    sources = family_sources(load_family(args.family, args.families_dir, args.schema), str(path))
    if args.only:
        unknown = sorted(set(args.only) - set(sources))
        if unknown:
            raise SourceError(f"{path}: --only: unknown source(s) {unknown}; known: {', '.join(sources)}")
        sources = {name: s for name, s in sources.items() if name in args.only}
    mirror = args.mirror or (Path(os.environ[DEFAULT_MIRROR_ENV]) if os.environ.get(DEFAULT_MIRROR_ENV) else None)
    return fetch_sources(sources, mirror, args.cache_dir)
