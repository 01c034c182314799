"""Load and validate the study configuration and the model-family preset.

Every error names the file and the key (e.g. ``config.yaml: runs[2].method``) so a user can fix
the config before any job runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from referencing import Registry


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the key."""


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        with path.open() as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def _key_path(path_parts) -> str:
    out = ""
    for part in path_parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _registry(schema_dir: Path) -> Registry:
    """Every schema in the folder, addressable by file name (family presets reuse config defs)."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resources = [
        (path.name, Resource.from_contents(load_yaml(path), default_specification=DRAFT202012))
        for path in sorted(schema_dir.glob("*.schema.yaml"))
    ]
    return Registry().with_resources(resources)


def validate(document: Any, schema_path: str | Path, source: str) -> None:
    """Validate ``document`` against a JSON Schema (YAML file); raise ConfigError naming the key."""
    import jsonschema  # here, not at the top: every job imports this module through the CLI's parser (~0.1 s)

    schema_path = Path(schema_path)
    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema, registry=_registry(schema_path.parent))
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for err in errors:
        key = _key_path(err.absolute_path)
        if err.validator == "required":
            missing = err.message.split("'")[1]
            lines.append(f"{source}: {_key_path([*err.absolute_path, missing])}: required key is missing")
        else:
            lines.append(f"{source}: {key}: {err.message}")
    raise ConfigError("invalid configuration\n  " + "\n  ".join(lines))


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated by ``override``; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_family(name: str, families_dir: str | Path, schema_path: str | Path, overrides: dict | None = None) -> dict:
    """Read config/families/<name>.yaml (over the files its ``include`` names), apply the config's
    ``family_overrides``, validate.

    Unknown names list the known ones.
    """
    families_dir = Path(families_dir)
    path = families_dir / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in families_dir.glob("*.yaml"))
        raise ConfigError(f"config: family: unknown family {name!r}; known families: {', '.join(known)}")
    family = deep_merge(_with_includes(load_yaml(path) or {}, families_dir, path), overrides or {})
    validate(family, schema_path, source=f"{path} (+ config family_overrides)" if overrides else str(path))
    if family["name"] != name:
        raise ConfigError(f"{path}: name: {family['name']!r} does not match the file name {name!r}")
    return family


def _with_includes(family: dict, families_dir: Path, path: Path) -> dict:
    """``include: [shared/x.yaml, ...]`` (relative to the families folder): those files deep-merged in
    order, then the family's own keys over them, so presets share one copy of a data/benchmark setup."""
    includes = family.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include: expected a list of file names, got {includes!r}")
    merged: dict = {}
    for name in includes:
        shared = families_dir / name
        if not shared.is_file():
            raise ConfigError(f"{path}: include: no file {shared}")
        content = load_yaml(shared) or {}
        if "include" in content:
            raise ConfigError(f"{shared}: include: an included file may not include others")
        merged = deep_merge(merged, content)
    return deep_merge(merged, family)
