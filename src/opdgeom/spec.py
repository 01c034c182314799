"""The typed run spec: what the plan validates and ``opdgeom train`` receives, as dataclasses.

The study plan builds a :class:`RunSpec` per run from the validated config; it travels to the
training job as JSON (``RunSpec.to_json``) and comes back as the same object (``RunSpec.from_json``),
so every module below the CLI reads attributes, and a misspelt key fails when it is planned, not
inside a GPU job. Adding a run option: the schema, the dataclass field here, the code that uses it,
config/README.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from opdgeom.config import ConfigError

# Every training method, and which of them need what; the schema's enum lists the same names.
METHODS = ("sft", "opd", "rlvr", "mix")
POLICY_GRADIENT_METHODS = ("opd", "rlvr", "mix")
METHODS_NEEDING_TEACHER = ("opd", "mix")  # their advantage has the teacher's reverse KL in it
METHODS_USING_REWARD = ("rlvr", "mix")  # their advantage has GRPO's group-normalised reward in it


# Runs expanded from a ``seeds:`` list are named "<entry>.s<seed>".
SEED_SUFFIX = re.compile(r"\.s\d+$")


def run_group(run: str) -> str:
    """The config entry a run comes from: "opd.s1" -> "opd"; an unseeded run is its own group."""
    return SEED_SUFFIX.sub("", run)


class SpecError(ConfigError):
    """A run spec with a missing, unknown or ill-typed field; the message names it."""


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if required:
        raise SpecError(f"{where}: missing key(s) {required}")
    return cls(**data)


def _plain(obj) -> dict:
    """A dataclass as a JSON-ready dict, without the optional fields left at None."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


@dataclass(frozen=True)
class TrainSettings:
    """One run's training settings: the config's ``train`` defaults, the family's, the run's own."""

    steps: int
    batch_size: int  # prompts per step (SFT: demonstrations per step)
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    checkpoint_every: int
    max_new_tokens: int  # rollout length cap
    temperature: float
    group_size: int  # samples per prompt (GRPO's G)
    rho_clip: float | None = None  # bound rho to [1/c, c]
    rollout_engine: str = "hf"  # hf: transformers generate; vllm: a vLLM engine
    # The vLLM rollout engine's KV cache per rank (GiB); rollouts beyond it queue in the engine.
    # None: room for all of a step's rollouts at full length at once.
    kv_cache_gb: float | None = None
    teacher_engine: str = "hf"  # who scores for OPD: hf (the sharded teacher) or vllm (an engine per rank)
    # Rows of one forward/backward pass are packed up to this many tokens (gradient accumulation
    # over the rest of the batch); None: the whole local batch in one pass.
    micro_batch_tokens: int | None = None
    # FSDP2 compute precision ("bf16": bf16 gathers, fp32 gradient reduction; master weights and
    # AdamW state stay fp32 either way; frozen models are then held in bf16) and per-layer
    # activation checkpointing. The tiny study keeps fp32 / off: bitwise-reproducible on CPU.
    mixed_precision: str = "fp32"
    activation_checkpointing: bool = False

    @property
    def checkpoint_steps(self) -> list[int]:
        """Every ``checkpoint_every`` steps, and always the last step."""
        return sorted({*range(self.checkpoint_every, self.steps + 1, self.checkpoint_every), self.steps})

    @classmethod
    def from_dict(cls, data: dict, where: str = "train") -> TrainSettings:
        settings = _build(cls, data, where)
        # Both engines sleep between phases through vLLM's CuMem allocator, which allows one instance
        # per process ("CuMem allocator can only be used for one instance per process",
        # v1/worker/gpu_worker.py): on a GPU the second engine would fail at start-up. The CPU build
        # has no memory pool, so only this check stands between a config and that failure.
        if settings.rollout_engine == "vllm" and settings.teacher_engine == "vllm":
            raise SpecError(
                f"{where}: rollout_engine vllm with teacher_engine vllm needs two sleeping vLLM engines in "
                "one process, which vLLM's CuMem allocator refuses on GPUs; use teacher_engine hf (the "
                "sharded bf16 teacher) with vLLM rollouts"
            )
        return settings


@dataclass(frozen=True)
class TokenMask:
    select: str  # "top": largest per-token reverse KL; "random"
    keep: float  # fraction of completion tokens trained on


@dataclass(frozen=True)
class Behaviour:
    policy: str  # "anchor": the run's frozen init; "lagged": a copy refreshed every lag steps
    lag: int | None = None


@dataclass(frozen=True)
class Projection:
    mode: str  # "gradient" | "update"
    rank: int
    reference: str  # the unconstrained run whose update spans the subspace
    at_fraction: float


@dataclass(frozen=True)
class RunSpec:
    """One training run, fully resolved: what to train, from where, with which settings."""

    name: str
    method: str
    init: str  # a model of the family or another run's name
    domain: str
    teacher: str | None  # a model of the family (the plan says which checkpoint serves it)
    train: TrainSettings
    alpha: float | None = None  # mix: A = alpha * A_OPD + (1 - alpha) * A_RLVR
    token_mask: TokenMask | None = None
    behaviour: Behaviour | None = None
    projection: Projection | None = None
    # The run's seed (batch order and every random draw); None: the config's top-level seed. Runs
    # expanded from a ``seeds:`` list carry theirs (see opdgeom.plan, names "<entry>.s<seed>").
    seed: int | None = None
    # How the teacher reads a prompt: "raw" like the student, or "chat" (its own chat template,
    # thinking off), from the teacher model's entry in the family preset.
    teacher_prompt_format: str = "raw"

    @property
    def is_policy_gradient(self) -> bool:
        return self.method in POLICY_GRADIENT_METHODS

    @property
    def checkpoint_steps(self) -> list[int]:
        return self.train.checkpoint_steps

    def to_json(self) -> dict:
        out = {"name": self.name, "method": self.method, "init": self.init, "domain": self.domain}
        out |= {"teacher": self.teacher} if self.teacher else {}
        out |= {"teacher_prompt_format": self.teacher_prompt_format} if self.teacher_prompt_format != "raw" else {}
        out["train"] = _plain(self.train)
        for option in ("alpha", "token_mask", "behaviour", "projection", "seed"):
            value = getattr(self, option)
            if value is not None:
                out[option] = value if option in ("alpha", "seed") else _plain(value)
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = "run") -> RunSpec:
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping, got {data!r}")
        options = {"token_mask": TokenMask, "behaviour": Behaviour, "projection": Projection}
        typed = dict(data)
        typed.setdefault("teacher", None)
        typed["train"] = TrainSettings.from_dict(data.get("train"), f"{where}.train")
        for key, option_cls in options.items():
            if data.get(key) is not None:
                typed[key] = _build(option_cls, data[key], f"{where}.{key}")
        spec = _build(cls, typed, where)
        if spec.method not in METHODS:
            raise SpecError(f"{where}.method: unknown method {spec.method!r}; known: {', '.join(METHODS)}")
        return spec
