"""A real domain's data for the study's three roles, from the family preset's pinned sources.

- ``sft``: demonstrations the SFT runs imitate (a reasoning domain: long chain-of-thought solutions
  ending in ``\\boxed{}``);
- ``prompts``: problems with reference answers the policy-gradient methods (OPD, RLVR, mixes) sample on;
- ``eval``: the held-out split every checkpoint is scored on (accuracy, and the NLL of its
  demonstrations); without an ``eval`` source it is held out from the demonstrations, disjoint from them.
``train`` names one source for both training roles (a data set whose records are both, like GSM8K).

Training problems that share a word 8-gram with a benchmark problem or a held-out problem are left out
(``tasks.decontaminate``), and every count (read, too long, without a verified trace, held out,
decontaminated) goes to the log: nothing is dropped silently.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from opdgeom.tasks.base import Example, take
from opdgeom.tasks.decontaminate import Decontaminator
from opdgeom.tasks.sources import LoadedSource, Source, SourceError, load_source

ROLES = ("sft", "prompts", "train", "eval")


@dataclass(frozen=True)
class DomainSources:
    """Which source feeds each role (``train`` is the default of ``sft`` and ``prompts``)."""

    sft: Source
    prompts: Source
    eval: Source | None = None

    @classmethod
    def from_roles(cls, roles: Mapping[str, Source], where: str) -> DomainSources:
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise SourceError(f"{where}: unknown role(s) {unknown}; known: {', '.join(ROLES)}")
        missing = [role for role in ("sft", "prompts") if role not in roles and "train" not in roles]
        if missing:
            raise SourceError(
                f"{where}: no source for {' and '.join(missing)} (family preset keys <domain>.{missing[0]}, "
                "or <domain>.train for both training roles)"
            )
        return cls(roles.get("sft", roles.get("train")), roles.get("prompts", roles.get("train")), roles.get("eval"))


@dataclass
class DataSplits:
    """What rule ``data`` writes: demonstrations (``sft``), policy-gradient prompts (``train``), the
    held-out split (``eval``), and the log lines that account for every record."""

    sft: list[Example]
    train: list[Example]
    eval: list[Example]
    report: list[str] = field(default_factory=list)


def real_splits(
    domain: str,
    sources: DomainSources,
    n_train: int,
    n_eval: int,
    seed: int,
    family: str | None = None,
    tokenizer=None,
    benchmarks: Mapping[str, Source] | None = None,
) -> DataSplits:
    """Read every role offline (``load_source``), hold out the eval split, decontaminate, then take
    ``n_train`` of each training role (shuffled by ``seed``) and ``n_eval`` held-out examples.

    ``tokenizer`` measures the sources' ``max_tokens`` (the student's; characters without one);
    ``benchmarks``: sources whose problems no training example may share an 8-gram with."""
    report: list[str] = []

    def load(source: Source, **options) -> LoadedSource:
        loaded = load_source(source, family=family, tokenizer=tokenizer, **options)
        report.append(loaded.summary())
        return loaded

    demos = load(sources.sft)
    prompts = demos if sources.prompts == sources.sft else load(sources.prompts)
    order = list(range(len(demos.examples)))
    random.Random(seed).shuffle(order)
    if sources.eval is not None:
        held = load(sources.eval)
        eval_examples, eval_problems = held.examples[:n_eval], held.problems[:n_eval]
        demo_rows = order
    else:  # the first n_eval demonstrations of the seeded order are held out
        eval_rows, demo_rows = order[:n_eval], order[n_eval:]
        eval_examples = [demos.examples[i] for i in eval_rows]
        eval_problems = [demos.problems[i] for i in eval_rows]
        report.append(f"{domain} eval: {len(eval_rows)} demonstrations held out ({sources.sft.describe()})")
    excluded = list(eval_problems)
    for name, source in (benchmarks or {}).items():
        bench = load_source(source, family=family)
        excluded += bench.problems
        report.append(f"decontaminating against benchmark {name}: {len(bench.problems)} problems")
    clean = Decontaminator(excluded)

    def kept(loaded: LoadedSource, rows: list[int], role: str) -> list[Example]:
        rows_kept = [i for i in rows if not clean.contaminated(loaded.problems[i])]
        report.append(
            f"{domain} {role}: {len(rows) - len(rows_kept)} of {len(rows)} left out for sharing an 8-gram "
            "with a held-out or benchmark problem"
        )
        return [loaded.examples[i] for i in rows_kept]

    sft = kept(demos, demo_rows, "sft")
    if prompts is demos:
        train = sft
    else:
        prompt_rows = list(range(len(prompts.examples)))
        random.Random(seed + 1).shuffle(prompt_rows)
        train = kept(prompts, prompt_rows, "prompts")
    splits = DataSplits(
        take(domain, sft, n_train, "demonstration"),
        take(domain, train, n_train, "prompt"),
        take(domain, eval_examples, n_eval, "held-out"),
        report,
    )
    splits.report.append(
        f"{domain}: {len(splits.sft)} demonstrations, {len(splits.train)} prompts, {len(splits.eval)} held out"
    )
    empty = [role for role in ("sft", "train", "eval") if not getattr(splits, role)]
    if empty:
        raise ValueError(f"domain {domain!r}: no {', '.join(empty)} examples left; " + "; ".join(report))
    return splits
