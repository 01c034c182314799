"""What a study produces besides checkpoints: figure targets and held-out benchmarks, as typed specs.

A figure target names its function (``opdgeom.figures.FIGURES``), its runs and options. A benchmark is
a fixed held-out set that every checkpoint is scored on with its own decoding (greedy, or avg@k at a
temperature and top-p), read from one of the family's pinned sources and scored by a domain's verifier.
Each functional-sufficiency figure (``fig6``) is drawn once on the study domain's held-out split and
once per benchmark (``fig6_<benchmark>``, file ``fig6.<benchmark>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from opdgeom.config import ConfigError

# Which table each figure is drawn from (opdgeom.figures.FIGURES has the functions; a test keeps
# the two in step) and which files it writes.
FIGURE_DATA = {
    "table1": "compare", "accuracy": "eval", "rotation": "compare", "drift": "compare",
    "localization": "compare", "heatmap": "compare", "fig4a": "trajectory", "fig4b": "trajectory",
    "fig4c": "trajectory", "fig5": "trajectory", "fig6": "eval", "fig7a": "trajectory",
    "fig7b": "trajectory", "fig7c": "trajectory", "budget": "geometry", "findings": "all",
}  # fmt: skip
FIGURE_EXTENSIONS = {"table1": ("csv", "md"), "findings": ("md", "html")}
PER_BENCHMARK = ("fig6",)  # figures drawn again on every benchmark


@dataclass(frozen=True)
class FigureSpec:
    """One figure target: its runs (config order), the options its function receives, the file name
    its outputs take in figures/ (default: the figure's name) and, for a per-benchmark copy, the
    benchmark whose tables it draws."""

    name: str
    runs: tuple[str, ...]
    options: dict = field(hash=False)
    file: str = ""
    function: str = ""  # default: the name
    benchmark: str = ""

    @property
    def stem(self) -> str:
        return self.file or self.name

    @property
    def kind(self) -> str:
        return self.function or self.name

    @property
    def extensions(self) -> tuple[str, ...]:
        return FIGURE_EXTENSIONS.get(self.kind, ("png", "pdf", "csv"))


@dataclass(frozen=True)
class Benchmark:
    """A held-out benchmark: examples from the family's ``sources[source]``, scored by ``domain``'s
    verifier, accuracy greedy (k 1) or avg@k at ``temperature`` / ``top_p``."""

    name: str
    source: str
    domain: str
    max_new_tokens: int
    k: int = 1
    temperature: float = 0.0
    top_p: float = 1.0

    def flags(self) -> str:
        """The evaluate command's decoding flags."""
        return (f"--max-new-tokens {self.max_new_tokens} --k {self.k} --accuracy-temperature {self.temperature} "
                f"--top-p {self.top_p}")  # fmt: skip


def resolve_benchmarks(family: dict, known_domains: list[str]) -> dict[str, Benchmark]:
    """The family preset's ``benchmarks:`` as typed specs; errors name the key."""
    out = {}
    for name, entry in family.get("benchmarks", {}).items():
        where = f"config: family {family['name']}: benchmarks.{name}"
        if entry["source"] not in family.get("sources", {}):
            raise ConfigError(f"{where}.source: {entry['source']!r} is not in the family's sources")
        if entry["domain"] not in known_domains:
            raise ConfigError(f"{where}.domain: unknown domain {entry['domain']!r}; known: {', '.join(known_domains)}")
        k, temperature = entry.get("k", 1), entry.get("temperature", 0.0)
        if (k > 1) != (temperature > 0):
            raise ConfigError(f"{where}: avg@k needs k > 1 with temperature > 0, greedy k 1 with temperature 0")
        out[name] = Benchmark(name, entry["source"], entry["domain"], entry["max_new_tokens"], k, temperature,
                              entry.get("top_p", 1.0))  # fmt: skip
    return out


def per_benchmark_figures(figures: dict[str, FigureSpec], benchmarks: dict[str, Benchmark]) -> dict[str, FigureSpec]:
    """Each per-benchmark figure again on every benchmark: ``fig6`` -> ``fig6_math500`` (file fig6.math500)."""
    out = dict(figures)
    for spec in figures.values():
        if spec.kind not in PER_BENCHMARK:
            continue
        for bench in benchmarks.values():
            name = f"{spec.name}_{bench.name}"
            out[name] = replace(spec, name=name, file=f"{spec.stem}.{bench.name}", function=spec.kind,
                                benchmark=bench.name, options={**spec.options, "domain": bench.domain})  # fmt: skip
    return out
