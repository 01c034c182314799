"""The study plan: config + family preset -> models, runs, checkpoints and output paths.

The Snakefile expands every target from a :class:`Study`; nothing in the workflow re-derives what
is planned here. Paths are relative to the working directory, under ``<results_dir>/<family>/``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from opdgeom.config import ConfigError, deep_merge, load_family, validate
from opdgeom.spec import (
    METHODS_NEEDING_TEACHER,
    SEED_SUFFIX,
    Behaviour,
    Projection,
    RunSpec,
    TokenMask,
    TrainSettings,
    run_group,
)
from opdgeom.targets import FIGURE_DATA, FigureSpec, per_benchmark_figures, resolve_benchmarks
from opdgeom.tasks import known_domains

OPTION_CLASSES = {"token_mask": TokenMask, "behaviour": Behaviour, "projection": Projection}
# A run entry with ``seeds: [0, 1, 2]`` becomes the runs "<name>.s0", "<name>.s1", "<name>.s2"; the
# suffix is reserved for them. A seeded run starting from (or projecting on) another seeded entry uses
# its replicate of the same seed, else the first one; an unseeded run uses the first replicate too.


def seed_run_name(entry: str, seed: int) -> str:
    return f"{entry}.s{seed}"


def _check_seeds(where: str, seeds) -> list[int]:
    ok = (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        and len(set(seeds)) == len(seeds)
    )
    if not ok:
        raise ConfigError(f"{where}.seeds: expected a non-empty list of distinct non-negative integers, got {seeds!r}")
    return list(seeds)


def expand_seeds(entries: list[dict]) -> list[tuple[int, dict]]:
    """(config index, run entry) per planned run: entries with ``seeds`` repeated once per seed."""
    seeds_of = {}
    for i, entry in enumerate(entries):
        if SEED_SUFFIX.search(str(entry.get("name", ""))):
            raise ConfigError(
                f"config: runs[{i}].name: {entry['name']!r} ends in '.s<N>', reserved for the runs of a 'seeds:' list"
            )
        if "seeds" in entry:
            seeds_of[entry["name"]] = _check_seeds(f"config: runs[{i}]", entry["seeds"])

    def resolve(ref: str, seed: int | None) -> str:
        if ref not in seeds_of:
            return ref
        return seed_run_name(ref, seed if seed in seeds_of[ref] else seeds_of[ref][0])

    out = []
    for i, entry in enumerate(entries):
        for seed in seeds_of.get(entry["name"], [None]):
            e = {k: v for k, v in entry.items() if k != "seeds"}
            if seed is not None:
                e["name"], e["seed"] = seed_run_name(entry["name"], seed), seed
            e["init"] = resolve(entry["init"], seed)
            if "projection" in e:
                e["projection"] = {**e["projection"], "reference": resolve(e["projection"]["reference"], seed)}
            out.append((i, e))
    return out


@dataclass(frozen=True)
class TrainResources:
    """How one training job runs: ``nodes`` x ``gpus_per_node`` ranks (torchrun, FSDP2) for hub
    families (default one node of 8 GPUs), one process for built (tiny) ones."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem_gb: float = 80.0  # what the memory plan checks the family against before any job

    @property
    def nproc_per_node(self) -> int:
        return self.gpus_per_node

    def job_resources(self) -> dict:
        """Rule train's resources. One node: ``gpu`` GPUs (the Slurm plugin's --gpus). Several: the
        plugin's multi-node form, gres per node, one task per node, the shell run once (mpi)."""
        common = {"nodes": self.nodes, "nproc_per_node": self.nproc_per_node}
        if self.nodes == 1:
            return {**common, "gpu": self.gpus_per_node}
        return {**common, "gres": f"gpu:{self.gpus_per_node}", "tasks": self.nodes, "tasks_per_gpu": 0, "mpi": "srun"}


class Study:
    """The planned study for one family. Build it with :meth:`from_config`."""

    def __init__(self, config: dict, family: dict):
        self.config = config
        self.family = family
        self.name = family["name"]
        self.seed = config["seed"]
        self.data = deep_merge(config["data"], family.get("data", {}))
        if self.data["domain"] not in known_domains():
            raise ConfigError(
                f"config: data.domain: unknown domain {self.data['domain']!r}; known: {', '.join(known_domains())}"
            )
        self.evaluate = deep_merge(config["evaluate"], family.get("evaluate", {}))
        self.diagnose = config["diagnose"]
        self.train_defaults = deep_merge(config["train"], family.get("train", {}))
        # Named recipes: config.yaml's, each deep-merged with the family's override of the same name.
        self.recipes = deep_merge(config.get("recipes", {}), family.get("recipes", {}))
        self.results = Path(config["results_dir"]) / self.name
        self.cache_dir = Path(config["cache_dir"])
        self.models = family["models"]
        # Hub families run on GPU nodes and are checked against them; built (tiny) ones are one process.
        self.hub = any(m["source"] == "hub" for m in family["models"].values())
        self._check_sources()
        self.train_resources = self._train_resources(family, self.hub)
        if self.hub:
            self._check_memory(family)
        self.planned = expand_seeds(config["runs"])
        self.runs = self._resolve_runs(self.planned)
        self.benchmarks = resolve_benchmarks(family, known_domains())
        self.figures = per_benchmark_figures(self._resolve_figures(config["figures"]), self.benchmarks)

    @classmethod
    def from_config(cls, config: dict, families_dir: str | Path, schema_dir: str | Path) -> "Study":
        schema_dir = Path(schema_dir)
        validate(config, schema_dir / "config.schema.yaml", source="config")
        family = load_family(
            config["family"], families_dir, schema_dir / "family.schema.yaml", config.get("family_overrides")
        )
        return cls(config, family)

    # ---------------------------------------------------------------- runs
    def _resolve_runs(self, planned: list[tuple[int, dict]]) -> dict[str, RunSpec]:
        runs: dict[str, RunSpec] = {}
        index = {entry["name"]: i for i, entry in planned}
        for i, entry in planned:
            where = f"config: runs[{i}]"
            name = entry["name"]
            if name in runs or name in self.models:
                raise ConfigError(f"{where}.name: {name!r} is used twice (run and model names share one namespace)")
            teacher = entry.get("teacher", "teacher") if entry["method"] in METHODS_NEEDING_TEACHER else None
            if teacher is not None and teacher not in self.models:
                raise ConfigError(f"{where}.teacher: unknown model {teacher!r}; models: {', '.join(self.models)}")
            options = {k: cls(**entry[k]) for k, cls in OPTION_CLASSES.items() if k in entry}
            runs[name] = RunSpec(
                name=name,
                method=entry["method"],
                init=entry["init"],
                domain=self._domain(entry.get("domain", self.data["domain"])),
                teacher=teacher,
                train=TrainSettings.from_dict(self._run_train(where, entry), f"{where}.train"),
                alpha=entry.get("alpha"),
                seed=entry.get("seed"),
                teacher_prompt_format=self.models[teacher].get("prompt_format", "raw") if teacher else "raw",
                **options,
            )
            self._check_options(where, runs[name])
        domains = known_domains()
        for spec in runs.values():
            i = index[spec.name]
            if spec.domain not in domains:
                raise ConfigError(
                    f"config: runs[{i}].domain: unknown domain {spec.domain!r}; known: {', '.join(domains)}"
                )
            if spec.init not in runs and spec.init not in self.models:
                known = ", ".join([*self.models, *runs])
                raise ConfigError(f"config: runs[{i}].init: unknown model or run {spec.init!r}; known: {known}")
        for spec in runs.values():
            i = index[spec.name]
            reference = spec.projection.reference if spec.projection else None
            if reference is not None and reference not in runs:
                raise ConfigError(f"config: runs[{i}].projection.reference: unknown run {reference!r}")
        self._check_acyclic(runs)
        runs.update(self._teacher_finetunes(runs))
        return runs

    def _run_train(self, where: str, entry: dict) -> dict:
        """config train < family train < the run's recipe (config's, then the family's) < run train."""
        settings = self.train_defaults
        if "recipe" in entry:
            name = entry["recipe"]
            if name not in self.recipes:
                known = ", ".join(self.recipes) or "none"
                raise ConfigError(f"{where}.recipe: unknown recipe {name!r}; known recipes: {known}")
            settings = deep_merge(settings, self.recipes[name])
        return deep_merge(settings, entry.get("train", {}))

    def _resolve_figures(self, entries: list[dict]) -> dict[str, FigureSpec]:
        figures = {}
        for i, entry in enumerate(entries):
            where = f"config: figures[{i}]"
            name = entry["name"]
            if name in figures:
                raise ConfigError(f"{where}.name: figure {name!r} is listed twice")
            options = {k: v for k, v in entry.items() if k not in ("name", "runs", "file")}
            unknown = [
                r
                for r in [*entry.get("runs", []), *(r for g in options.get("groups", {}).values() for r in g)]
                if r not in self.runs and r not in self.entry_runs
            ]
            if unknown:
                raise ConfigError(f"{where}: unknown run(s) {unknown}; runs: {', '.join(self.entry_runs)}")
            if "groups" in options:  # a config entry stands for all of its seed replicates
                options["groups"] = {g: self._expand_names(rs) for g, rs in options["groups"].items()}
            grouped = [r for group in options.get("groups", {}).values() for r in group]
            runs = self._expand_names(entry.get("runs", [])) or grouped or self.study_runs
            figures[name] = FigureSpec(name, tuple(dict.fromkeys(runs)), options, entry.get("file", ""))
        return figures

    def figure_inputs(self, name: str) -> list[Path]:
        """The tables a figure is drawn from: only its own runs (and references), nothing else."""
        spec = self.figures[name]
        kind = FIGURE_DATA[spec.kind]
        refs = dict.fromkeys([*spec.runs, *self.reference_refs])
        evals = [self.benchmark_table(spec.benchmark, r) if spec.benchmark else self.eval_table(r) for r in refs]
        if kind == "eval":
            return evals
        geometry = [t(run) for t in (self.compare_table, self.trajectory_table) for run in spec.runs]
        if kind == "geometry":
            return geometry
        if kind == "all":
            return [*evals, *geometry]
        table = self.compare_table if kind == "compare" else self.trajectory_table
        return [table(run) for run in spec.runs]

    @property
    def reference_refs(self) -> dict[str, str]:
        """Reference models drawn as flat lines: the student base and the (default) teacher."""
        return {"student": "base", self.teacher_ref("teacher", self.data["domain"]): "teacher"}

    def figure_options(self, name: str) -> dict:
        """Config options plus what the plan knows: each run's method, the diagnostics' k and alpha."""
        spec = self.figures[name]
        options = {"methods": {run: self.runs[run].method for run in spec.runs}, **spec.options}
        derived = {
            "accuracy": {"references": self.reference_refs},
            "fig6": {"references": self.reference_refs},
            "localization": {"alpha": self.diagnose["alpha"]},
            "rotation": {"k": self.diagnose["k"]},
            "fig5": {"k": self.diagnose["trajectory_k"]},
            "budget": {"budgets": {run: self.runs[run].train.lr * self.runs[run].train.steps for run in spec.runs}},
            "findings": {
                "references": self.reference_refs,
                "inits": {run: self.runs[run].init for run in spec.runs},
                "train": {
                    run: {"lr": self.runs[run].train.lr, "steps": self.runs[run].train.steps} for run in spec.runs
                },
                "k": self.diagnose["k"],
                "alpha": self.diagnose["alpha"],
            },
        }
        return {**derived.get(spec.kind, {}), **options}

    @staticmethod
    def _train_resources(family: dict, hub: bool) -> TrainResources:
        default = TrainResources(nodes=1, gpus_per_node=8 if hub else 1)
        return TrainResources(**{**dataclasses.asdict(default), **family.get("train_resources", {})})

    def _check_memory(self, family: dict) -> None:
        """Refuse at planning time a hub family whose training or evaluate jobs do not fit their GPUs."""
        from opdgeom.train.memory_plan import UnknownShapeError, check_fits  # torch: only hub families pay

        r = self.train_resources
        try:
            check_fits({**family, "train": self.train_defaults}, r.nodes * r.gpus_per_node, r.gpu_mem_gb)
        except UnknownShapeError as err:  # said, not hidden: the jobs will tell once the models are here
            print(f"warning: family {self.name}: memory not checked at planning: {err}", file=sys.stderr)
        except ValueError as err:
            raise ConfigError(f"config: family {self.name}: train_resources: {err}") from None
        from opdgeom.train.eval_plan import check_evaluate_fits

        try:
            check_evaluate_fits(family, self.evaluate, r.gpu_mem_gb)
        except UnknownShapeError as err:
            print(f"warning: family {self.name}: evaluate memory not checked at planning: {err}", file=sys.stderr)
        except ValueError as err:
            raise ConfigError(f"config: family {self.name}: evaluate: {err}") from None

    def _tracker_flags(self) -> list[str]:
        tracker = self.config.get("tracker", {})
        return [f"--tracker {tracker.get('kind', 'none')}", f"--tracker-project {tracker.get('project', 'opdgeom')}",
                f"--wandb-mode {tracker.get('wandb_mode', 'offline')}"]  # fmt: skip

    def watch_flags(self) -> str:
        """The train command's tracker and monitor flags, from the config's ``tracker`` and ``monitor``."""
        flags, monitor = self._tracker_flags(), self.config.get("monitor", {})
        if monitor.get("every", 0):
            flags.append(f"--monitor-every {monitor['every']} --monitor-k {monitor.get('k', 16)}")
        return " ".join(flags)

    def eval_tracker_flags(self, ref: str) -> str:
        """The evaluate command's tracker flags: a run's evaluation logs into the run's folder (beside its
        training series), a family model's into eval/tracker/<model>; "" without a tracker."""
        if self.config.get("tracker", {}).get("kind", "none") == "none":
            return ""
        where = self.run_dir(ref) if ref in self.runs else self.results / "eval" / "tracker" / ref
        return " ".join([*self._tracker_flags(), f"--tracker-dir {where}"])

    def eval_budget_flags(self) -> str:
        """The evaluate command's memory flags, from the resolved ``evaluate`` settings ("" when unset:
        batch_size rows per pass, batch_size whole sequences of KV cache)."""
        return self._evaluate_flags("score_tokens", "kv_cache_gb")

    def eval_decoding_flags(self) -> str:
        """The held-out evaluation's accuracy decoding (greedy unless ``evaluate.k`` says avg@k)."""
        return self._evaluate_flags("k", "accuracy_temperature", "top_p")

    def _evaluate_flags(self, *keys: str) -> str:
        flags = {f"--{key.replace('_', '-')}": self.evaluate.get(key) for key in keys}
        return " ".join(f"{flag} {value}" for flag, value in flags.items() if value is not None)

    def data_sources(self, domain: str) -> dict | None:
        """A real domain's pinned sources by role (family preset keys ``<domain>.<role>``, roles as
        ``tasks.roles.ROLES``), as the data command reads them; None: the domain's built-in location
        (or a synthetic generator)."""
        from opdgeom.tasks.roles import ROLES

        section = self.family.get("sources", {})
        roles = {role: section[f"{domain}.{role}"] for role in ROLES if f"{domain}.{role}" in section}
        return roles or None

    def data_tokenizer(self, domain: str) -> Path | None:
        """The student's tokenizer, when a source of the domain drops examples by ``max_tokens``."""
        if not any(s.get("max_tokens") for s in (self.data_sources(domain) or {}).values()):
            return None
        return self.model_dir("student") if self.family.get("tokenizer") == "model" else self.tokenizer_dir

    def train_data(self, spec: RunSpec) -> Path:
        """What a run trains on: demonstrations for SFT, prompts with answers for the others."""
        return self.data_file(spec.domain, "sft" if spec.method == "sft" else "train")

    def _check_sources(self) -> None:
        from opdgeom.tasks.sources import Source

        for name, entry in self.family.get("sources", {}).items():
            Source.from_dict(entry, f"config: family {self.name}: sources.{name}")

    def _domain(self, name: str) -> str:
        """A run's domain as this family runs it: the preset's ``domains`` map the study's names (the tiny
        synthetic "programs" becomes the real code domain "mbpp" on the hub families)."""
        return self.family.get("domains", {}).get(name, name)

    @staticmethod
    def _check_options(where: str, spec: RunSpec) -> None:
        if spec.method == "mix" and spec.alpha is None:
            raise ConfigError(f"{where}.alpha: required for method 'mix'")
        if spec.method == "sft" and (spec.token_mask or spec.behaviour or spec.alpha is not None):
            raise ConfigError(f"{where}: token_mask, behaviour and alpha apply to policy-gradient methods only")
        if spec.token_mask and spec.token_mask.select == "top" and spec.method == "rlvr":
            raise ConfigError(f"{where}.token_mask.select: 'top' ranks tokens by teacher KL; rlvr has no teacher")

    @staticmethod
    def _check_acyclic(runs: dict[str, RunSpec]) -> None:
        for start in runs:
            seen, name = [start], runs[start].init
            while name in runs:
                if name in seen:
                    raise ConfigError(f"config: runs: init forms a cycle: {' -> '.join([*seen, name])}")
                seen.append(name)
                name = runs[name].init
            projection = runs[start].projection
            if projection is not None and projection.reference == start:
                raise ConfigError(f"config: runs: {start!r} cannot be its own projection reference")

    def _teacher_finetunes(self, runs: dict[str, RunSpec]) -> dict[str, RunSpec]:
        """Built (tiny) teachers know nothing of the task: plan one SFT run per (teacher, domain)."""
        pairs = {("teacher", self.data["domain"])}
        pairs |= {(r.teacher, r.domain) for r in runs.values() if r.teacher}
        extra = {}
        for teacher, domain in sorted(pairs):
            if self.models[teacher]["source"] != "build":
                continue
            name = self.teacher_run_name(teacher, domain)
            settings = deep_merge(self.train_defaults, self.family.get("teacher_finetune", {}))
            train = TrainSettings.from_dict(settings, f"{self.name}: teacher_finetune")
            extra[name] = RunSpec(name, "sft", teacher, domain, None, train)
        return extra

    def teacher_run_name(self, teacher: str, domain: str) -> str:
        return f"{teacher}.{domain}"

    @property
    def study_runs(self) -> list[str]:
        """Runs declared in the config, seed replicates expanded (no teacher fine-tunes), in order."""
        return [entry["name"] for _, entry in self.planned]

    @property
    def entry_runs(self) -> dict[str, list[str]]:
        """Config entry name -> its planned runs (one, or one per seed)."""
        out: dict[str, list[str]] = {}
        for _, entry in self.planned:
            out.setdefault(run_group(entry["name"]) if "seed" in entry else entry["name"], []).append(entry["name"])
        return out

    def _expand_names(self, names) -> list[str]:
        entries = self.entry_runs
        return list(dict.fromkeys(r for name in names for r in entries.get(name, [name])))

    def run_seed(self, run: str) -> int:
        """The seed a run trains with: its own (seed replicates) or the config's."""
        seed = self.runs[run].seed
        return self.seed if seed is None else seed

    @property
    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.runs.values()} | {self.data["domain"]})

    # ---------------------------------------------------------------- paths
    def model_dir(self, model: str) -> Path:
        return self.results / "models" / model

    def run_dir(self, run: str) -> Path:
        return self.results / "runs" / run

    def manifest(self, run: str) -> Path:
        return self.run_dir(run) / "manifest.json"

    def checkpoint_dir(self, run: str, step: int) -> Path:
        return self.run_dir(run) / f"step_{step:06d}"

    def final_checkpoint(self, run: str) -> Path:
        return self.checkpoint_dir(run, self.runs[run].train.steps)

    def ref_path(self, ref: str) -> Path:
        """A model of the family or a run's final checkpoint."""
        return self.model_dir(ref) if ref in self.models else self.final_checkpoint(ref)

    def ref_marker(self, ref: str) -> Path:
        """The file that proves ``ref`` exists (what a rule depends on)."""
        return self.model_dir(ref) if ref in self.models else self.manifest(ref)

    def prompt_format(self, ref: str) -> str:
        """How a model of the family (or a run's checkpoint: always raw, a trained student) reads a prompt."""
        return self.models[ref].get("prompt_format", "raw") if ref in self.models else "raw"

    def basis_file(self, run: str) -> Path:
        """The training subspace of a projected run: its reference run's update at ``at_fraction``."""
        p = self.runs[run].projection
        reference, step = self.projection_checkpoint(run)
        return self.results / "diagnose" / "basis" / f"{reference}.step{step:06d}.rank{p.rank}.safetensors"

    def projection_checkpoint(self, run: str) -> tuple[str, int]:
        """(reference run, its checkpoint step nearest to at_fraction of its training)."""
        p = self.runs[run].projection
        ref = self.runs[p.reference]
        target = p.at_fraction * ref.train.steps
        return ref.name, min(ref.checkpoint_steps, key=lambda step: (abs(step - target), step))

    def teacher_ref(self, teacher: str, domain: str) -> str:
        if self.models[teacher]["source"] == "build":
            return self.teacher_run_name(teacher, domain)
        return teacher

    def data_file(self, domain: str, split: str) -> Path:
        return self.results / "data" / domain / f"{split}.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.results / "tokenizer"

    @property
    def pretrain_corpus(self) -> Path:
        return self.results / "data" / "pretrain.jsonl"

    def eval_table(self, ref: str) -> Path:
        return self.results / "eval" / f"{ref}.parquet"

    def benchmark_table(self, benchmark: str, ref: str) -> Path:
        return self.results / "eval" / "bench" / benchmark / f"{ref}.parquet"

    def benchmark_file(self, benchmark: str) -> Path:
        return self.results / "data" / "bench" / f"{benchmark}.jsonl"

    def benchmark_source(self, benchmark: str) -> dict:
        return self.family["sources"][self.benchmarks[benchmark].source]

    def compare_table(self, run: str) -> Path:
        return self.results / "diagnose" / "compare" / f"{run}.parquet"

    def trajectory_table(self, run: str) -> Path:
        return self.results / "diagnose" / "trajectory" / f"{run}.parquet"

    def figure_outputs(self, name: str) -> list[Path]:
        spec = self.figures[name]
        return [self.results / "figures" / f"{spec.stem}.{ext}" for ext in spec.extensions]

    @property
    def eval_refs(self) -> list[str]:
        """Everything whose accuracy the study reports: the student base, the teacher, every run."""
        teacher = self.teacher_ref("teacher", self.data["domain"])
        return list(dict.fromkeys(["student", teacher, *self.study_runs]))
