"""The import rule of docs/architecture.md: a unit of the package imports only units of a lower layer.
The layer table is read from the document, so the document and the rule cannot drift apart."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "opdgeom"


def layers() -> dict[str, int]:
    """Unit -> layer, from the table rows `| N | `unit`, ... | ... |` of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table: dict[str, int] = {}
    for layer, units in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.M):
        for unit in re.findall(r"`([\w.]+)`", units):
            assert unit not in table, f"docs/architecture.md puts {unit} in two layers"
            table[unit] = int(layer)
    return table


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(path: Path) -> set[tuple[str, int]]:
    """(unit, line) of every opdgeom import in ``path``, those inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package imports absolutely")
        names = [node.module] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = (name or "").split(".")
            if parts[0] == "opdgeom" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_every_unit_of_the_package_has_a_layer():
    table = layers()
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    missing = sorted(units - set(table))
    assert not missing, f"units without a row in docs/architecture.md's layer table: {missing}"
    stale = sorted(u for u in table if u not in units and not (PACKAGE / f"{u}.py").exists())
    assert not stale, f"docs/architecture.md names units that do not exist: {stale}"


def test_imports_go_only_to_lower_layers():
    table = layers()
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        for target, line in sorted(imported_units(path)):
            if target != unit and target in table and table[target] >= table[unit]:
                rel = path.relative_to(REPO)
                violations.append(
                    f"{rel}:{line}: {unit} (layer {table[unit]}) imports {target} (layer {table[target]})"
                )
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: an import upward, hidden in a function, is found."""
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from opdgeom.train.loop import train\n    import opdgeom.figures\n")
    assert imported_units(module) == {("train", 2), ("figures", 3)}


def test_a_training_job_imports_only_what_it_uses():
    """Start-up (issue 28): `opdgeom train` without a monitor or tracker loads neither the geometry
    engine (polars, scipy) nor a tracker package nor vLLM."""
    import subprocess
    import sys

    code = (
        "import sys, opdgeom.cli, opdgeom.train.run; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('polars', 'scipy', 'tensorboard', 'wandb', 'trackio', 'vllm') or m.startswith('opdgeom.geometry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
