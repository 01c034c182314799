"""Per-rank GPU memory of one training job, planned before any job is submitted.

The family's real model configs (the published numbers, tabulated in ``HUB_SHAPES`` because nothing is
downloaded at planning time) are built on the meta device, so parameter counts are the models' own.
Sharding follows the code that trains: ``distributed.fsdp_units`` names the modules ``fully_shard`` wraps
(every decoder layer, then the root), and FSDP2 shards every parameter on dim 0 over the W ranks with
``torch.chunk`` semantics, padded to equal shards: a (d0, ...) parameter costs ceil(d0 / W) * prod(...)
elements on every rank (``shard_numel``; rank 0 holds exactly that many, tested against real FSDP2 shards
on two gloo ranks). fully_shard itself needs a process group, which planning has not got.

What is resident on a rank, and when (a run is rollout -> teacher scoring -> student update):

- always: student fp32 master weights, fp32 gradients, AdamW m and v (all sharded: 16 B / parameter / W),
  the teacher in bf16 (sharded), the frozen behaviour copy (anchor or lagged policy, bf16, sharded; a run
  has at most one);
- rollout: the colocated vLLM engine (one per rank, tensor parallel 1: the whole policy in bf16) and its
  KV cache for this rank's rollouts; the engine sleeps (weights offloaded, cache freed) otherwise;
- scoring: the teacher's gathered root unit and two layer units (FSDP2 prefetches the next layer),
  one layer's activations without grad, one logits chunk without grad;
- update: the student's gathered root unit (the root does not reshard between forward and backward), two
  layer units with their bf16 gradients and fp32 reduce-scatter buffer, the per-layer checkpointed
  activations at the micro-batch token budget plus one layer's recompute, one logits chunk with its
  gradient (``opdgeom.logprobs.token_logprobs`` chunking).

Activation sizes are estimates from the layer's tensor shapes (formulas in each component); allocator
fragmentation, the CUDA context and communication buffers are what ``headroom`` (default 10% of the
GPU) is for.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeom.logprobs import DEFAULT_CHUNK_TOKENS

GB = 1e9
BF16, FP32 = 2, 4
PHASES = ("rollout", "score", "update")
DEFAULT_MICRO_BATCH_TOKENS = 16_384
DEFAULT_PROMPT_TOKENS = 512  # prompt length assumed for KV-cache sizing (GSM8K prompts are ~100-300 tokens)
DEFAULT_HEADROOM = 0.10


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model's config.json that decide its memory."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    published_params: float | None = None  # the model card's count, for the test

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _qwen3(h, layers, heads, inter, tied, published) -> ModelShape:
    return ModelShape("qwen3", h, layers, heads, 8, 128, inter, 151_936, tied, published)


def _llama(h, layers, heads, inter, tied, published) -> ModelShape:
    return ModelShape("llama", h, layers, heads, 8, 128, inter, 128_256, tied, published)


# From each repository's config.json; the published counts are the model cards' (Qwen3 technical report,
# Llama 3.1 / 3.2 / 3.3 cards) or the exact sums the safetensors index reports.
HUB_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen3-0.6B-Base": _qwen3(1024, 28, 16, 3072, True, 0.596e9),
    "Qwen/Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, True, 0.596e9),
    "Qwen/Qwen3-1.7B-Base": _qwen3(2048, 28, 16, 6144, True, 1.72e9),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, True, 1.72e9),
    "Qwen/Qwen3-4B-Base": _qwen3(2560, 36, 32, 9728, True, 4.02e9),
    "Qwen/Qwen3-4B": _qwen3(2560, 36, 32, 9728, True, 4.02e9),
    "Qwen/Qwen3-8B-Base": _qwen3(4096, 36, 32, 12288, False, 8.19e9),
    "Qwen/Qwen3-8B": _qwen3(4096, 36, 32, 12288, False, 8.19e9),
    "Qwen/Qwen3-14B": _qwen3(5120, 40, 40, 17408, False, 14.8e9),
    "Qwen/Qwen3-32B": _qwen3(5120, 64, 64, 25600, False, 32.8e9),
    "meta-llama/Llama-3.2-3B": _llama(3072, 28, 24, 8192, True, 3.21e9),
    "meta-llama/Llama-3.1-8B": _llama(4096, 32, 32, 14336, False, 8.03e9),
    "meta-llama/Llama-3.1-8B-Instruct": _llama(4096, 32, 32, 14336, False, 8.03e9),
    "meta-llama/Llama-3.3-70B-Instruct": _llama(8192, 80, 64, 28672, False, 70.6e9),
}


class UnknownShapeError(ValueError):
    """A hub model whose config the plan cannot see (not in HUB_SHAPES, not in the local HF cache)."""


def _cached_shape(repo: str, revision: str) -> ModelShape | None:
    """The shape from the config.json of the revision's snapshot in the local HF cache, if any."""
    from opdgeom.hub import cached_file

    path = cached_file(repo, revision, "config.json")
    if path is None:
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    return ModelShape(
        config["model_type"], config["hidden_size"], config["num_hidden_layers"], heads,
        config.get("num_key_value_heads", heads), config.get("head_dim") or config["hidden_size"] // heads,
        config["intermediate_size"], config["vocab_size"], bool(config.get("tie_word_embeddings", False)),
    )  # fmt: skip


def shape_of(spec: dict) -> ModelShape:
    """A family's model entry (hub: the published numbers in HUB_SHAPES, else the config.json in the
    local HF cache; build: its own dimensions and the char vocabulary)."""
    if spec["source"] == "hub":
        if spec["repo"] in HUB_SHAPES:
            return HUB_SHAPES[spec["repo"]]
        shape = _cached_shape(spec["repo"], spec["revision"])
        if shape is None:
            raise UnknownShapeError(
                f"memory plan: no config numbers for {spec['repo']!r} (not in HUB_SHAPES, and its config.json "
                f"is not in the HF cache: `opdgeom fetch-models` first)"
            )
        return shape
    from opdgeom.tokenizer import build_char_tokenizer

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    return ModelShape(
        spec["architecture"], *(spec[k] for k in keys), spec["intermediate_size"],
        len(build_char_tokenizer()), False,
    )  # fmt: skip


def meta_model(shape: ModelShape):
    """The model itself, built from its transformers config on the meta device (no memory, no weights)."""
    import transformers

    from opdgeom.models import ARCHITECTURES

    config = ARCHITECTURES[shape.architecture](
        hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim, intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def layer_forward_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = BF16) -> int:
    """One decoder layer's no-grad forward over ``tokens`` positions at its peak: the residual stream,
    its norm, attention output and MLP output (4H), the q, k, v projections and the attention result
    (2q + 2kv), and the MLP's gate, up and activated intermediates (3I)."""
    per_token = 4 * shape.hidden_size + 2 * shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate_size
    return tokens * per_token * dtype_bytes


def shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of one parameter on each rank under FSDP2: dim-0 chunks of ceil(d0 / W) rows, padded."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


@dataclass(frozen=True)
class ShardedModel:
    """What the plan needs of one model under ``distributed.fsdp_units`` sharding."""

    params: int  # distinct parameters (tied matrices once)
    shard_params: int  # per rank, padded
    root_params: int  # the root unit's (embeddings, final norm, lm_head): gathered whole in its forward
    max_layer_params: int  # the largest decoder-layer unit: gathered one (plus one prefetched) at a time

    @classmethod
    def of(cls, model, world_size: int) -> "ShardedModel":
        from opdgeom.train.distributed import fsdp_units

        units = fsdp_units(model)
        seen: set[int] = set()
        unit_params: list[int] = []
        shard = 0
        for unit in units:  # innermost first: a parameter belongs to the first unit that holds it
            total = 0
            for param in unit.parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                total += param.numel()
                shard += shard_numel(tuple(param.shape), world_size)
            unit_params.append(total)
        return cls(sum(unit_params), shard, unit_params[-1], max(unit_params[:-1]))


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    formula: str
    phases: tuple[str, ...] = PHASES  # when it is resident


@dataclass(frozen=True)
class MemoryPlan:
    family: str
    gpus: int
    gpu_mem_bytes: int
    headroom: float
    student: str
    teacher: str
    student_params: int
    teacher_params: int
    micro_batch_tokens: int
    chunk_tokens: int
    components: tuple[Component, ...]
    phases: tuple[str, ...] = PHASES  # a training job's; an evaluate job has its own (train/eval_plan.py)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if phase in c.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_mem_bytes * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def overflow(self, largest: int = 5) -> str:
        """Why it does not fit: the peak, its phase's largest components and the usable memory."""
        worst = sorted((c for c in self.components if self.peak_phase in c.phases), key=lambda c: -c.bytes)
        parts = ", ".join(f"{c.name} {c.bytes / GB:.1f} GB" for c in worst[:largest])
        return (
            f"peak {self.peak_bytes / GB:.1f} GB per rank ({self.peak_phase} phase: {parts}) > "
            f"{self.usable_bytes / GB:.1f} GB usable ({self.headroom:.0%} headroom)"
        )

    def to_json(self) -> dict:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "components"},
            "components": [dataclasses.asdict(c) for c in self.components],
            "phase_bytes": {p: self.phase_bytes(p) for p in self.phases},
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
        }

    def render(self) -> str:
        lines = [
            f"memory plan: family {self.family}, {self.gpus} x {self.gpu_mem_bytes / GB:.0f} GB, per rank",
            f"  student {self.student} ({self.student_params / 1e9:.2f}e9 parameters), "
            f"teacher {self.teacher} ({self.teacher_params / 1e9:.2f}e9)",
            f"  micro-batch {self.micro_batch_tokens} tokens/rank, log-prob chunk {self.chunk_tokens} positions",
            f"  {'component':<22} {'GB':>7}  {'phases':<20} formula",
        ]
        for c in self.components:
            phases = "all" if c.phases == self.phases else ",".join(c.phases)
            lines.append(f"  {c.name:<22} {c.bytes / GB:7.2f}  {phases:<20} {c.formula}")
        for p in self.phases:
            lines.append(f"  phase {p:<16} {self.phase_bytes(p) / GB:7.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(
            f"  peak {self.peak_bytes / GB:.2f} GB ({self.peak_phase}) vs {self.usable_bytes / GB:.2f} GB usable "
            f"({self.gpu_mem_bytes / GB:.0f} GB less {self.headroom:.0%} headroom): {verdict}"
        )
        return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def sharded(shape: ModelShape, world_size: int) -> ShardedModel:
    """``ShardedModel.of`` the shape's meta-built model (cached: a 70B model takes a second to build)."""
    return ShardedModel.of(meta_model(shape), world_size)


def largest_model(family: dict, roles: tuple[str, ...]) -> tuple[str, ModelShape]:
    """The largest model among the roles present (the worst run of the study decides the fit)."""
    found = [(r, shape_of(family["models"][r])) for r in roles if r in family["models"]]
    sized = [(r, s, sharded(s, 1).params) for r, s in found]
    role, shape, _ = max(sized, key=lambda t: t[2])
    spec = family["models"][role]
    return spec.get("repo", f"{role} (built)"), shape


def plan(
    family: dict,
    gpus: int,
    gpu_mem_gb: float,
    micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    headroom: float = DEFAULT_HEADROOM,
    rollout_engine: bool = True,
    frozen_copies: int = 1,
    train: dict | None = None,
) -> MemoryPlan:
    """The per-rank plan for the family's largest student and teacher on ``gpus`` ranks.

    ``train`` supplies the rollout size (batch_size prompts x group_size samples x max_new_tokens); the
    family's own ``train`` section overrides it, and its ``micro_batch_tokens`` and ``mixed_precision``
    (bf16 on one GPU is FSDP2 over a one-rank group, as ``opdgeom train`` sets it up) are used.
    """
    if gpus < 1 or gpu_mem_gb <= 0:
        raise ValueError(f"memory plan: need gpus >= 1 and gpu_mem_gb > 0, got {gpus}, {gpu_mem_gb}")
    settings = {"batch_size": 64, "group_size": 8, "max_new_tokens": 1024, **(train or {}), **family.get("train", {})}
    student_name, s_shape = largest_model(family, ("student", "student_alt"))
    teacher_name, t_shape = largest_model(family, ("teacher", "teacher_alt"))
    # The family's own training settings decide the micro-batch and the compute precision.
    micro_batch_tokens = settings.get("micro_batch_tokens") or micro_batch_tokens
    return plan_shapes(
        family["name"], (student_name, s_shape), (teacher_name, t_shape), gpus, gpu_mem_gb, settings,
        micro_batch_tokens, chunk_tokens, headroom, rollout_engine, frozen_copies, settings.get("mixed_precision"),
    )  # fmt: skip


def plan_shapes(
    family_name: str,
    student: tuple[str, ModelShape],
    teacher: tuple[str, ModelShape],
    gpus: int,
    gpu_mem_gb: float,
    settings: dict,
    micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    headroom: float = DEFAULT_HEADROOM,
    rollout_engine: bool = True,
    frozen_copies: int = 1,
    mixed_precision: str | None = None,
) -> MemoryPlan:
    """``plan`` for explicit (name, shape) pairs (the benchmark's few-layer models). ``mixed_precision``
    defaults to bf16 under FSDP (gpus > 1) and fp32 for one plain process; "bf16" with one GPU is FSDP2
    over a one-rank group (what the GPU benchmark runs)."""
    (student_name, s_shape), (teacher_name, t_shape) = student, teacher
    W = gpus
    s, t = sharded(s_shape, W), sharded(t_shape, W)
    fsdp = (mixed_precision or ("bf16" if W > 1 else "fp32")) == "bf16" or W > 1
    compute = BF16 if fsdp else FP32  # the gathered compute copy's dtype
    upcast = FP32 if compute != FP32 else 0  # token_logprobs upcasts bf16 logits to fp32 (a no-op for fp32)
    N, H, L = micro_batch_tokens, s_shape.hidden_size, s_shape.num_hidden_layers
    per_token = 4 * H + 2 * s_shape.q_dim + 4 * s_shape.kv_dim + s_shape.q_dim + 4 * s_shape.intermediate_size
    sequences = math.ceil(settings["batch_size"] * settings["group_size"] / W)
    seq_tokens = DEFAULT_PROMPT_TOKENS + settings["max_new_tokens"]
    kv_per_token = 2 * L * s_shape.kv_dim * BF16
    update, score, rollout = ("update",), ("score",), ("rollout",)
    components = [
        Component("student params", FP32 * s.shard_params, "4 B x ceil-sharded params (fp32 master)"),
        Component("student grads", FP32 * s.shard_params, "4 B x sharded params (fp32, reduce-scattered)"),
        Component("optimizer", 2 * FP32 * s.shard_params, "8 B x sharded params (AdamW m, v fp32)"),
        Component("teacher", BF16 * t.shard_params, "2 B x sharded teacher params (bf16, frozen)"),
        Component(
            "frozen copies", frozen_copies * BF16 * s.shard_params, f"{frozen_copies} x 2 B x sharded student params"
        ),
    ]
    if fsdp:
        components += [
            Component(
                "student gathered",
                (compute + BF16 + FP32) * s.root_params + 2 * (compute + BF16 + FP32) * s.max_layer_params,
                "(root + 2 layers) x (2 B param + 2 B grad + 4 B fp32 reduce-scatter)",
                update,
            ),
            Component(
                "teacher gathered",
                BF16 * (t.root_params + 2 * t.max_layer_params),
                "2 B x (root + 2 layers)",
                score,
            ),
        ]
    components += [
        Component(
            "activations",
            compute * N * H * L + 2 * compute * N * per_token,
            f"{compute} B x N x H x L checkpointed inputs + 2 x {compute} B x N x (4H + 3q + 4kv + 4I) recompute",
            update,
        ),
        Component(
            "logits chunk",
            chunk_tokens * s_shape.vocab_size * (compute + upcast + FP32 + compute),
            f"chunk x V x ({compute} B logits{' + 4 B fp32 copy' * bool(upcast)} + 4 B grad + {compute} B grad)",
            update,
        ),
        Component(
            "teacher scoring",
            layer_forward_bytes(t_shape, N) + chunk_tokens * t_shape.vocab_size * (BF16 + FP32),
            "2 B x N x (4H + 2q + 2kv + 3I) of the teacher (one layer, no grad) + chunk x V x (2 B + 4 B)",
            score,
        ),
    ]
    if rollout_engine:
        components += [
            Component(
                "rollout weights", BF16 * s.params, "2 B x student params (vLLM colocated, TP 1, sleeps after)", rollout
            ),
            _rollout_kv(sequences, seq_tokens, kv_per_token, settings.get("kv_cache_gb")),
        ]
    return MemoryPlan(
        family=family_name, gpus=gpus, gpu_mem_bytes=int(gpu_mem_gb * GB), headroom=headroom,
        student=student_name, teacher=teacher_name, student_params=s.params, teacher_params=t.params,
        micro_batch_tokens=N, chunk_tokens=chunk_tokens, components=tuple(components),
    )  # fmt: skip


def _rollout_kv(sequences: int, seq_tokens: int, kv_per_token: int, budget_gb: float | None) -> Component:
    """The rollout engine's KV cache: every rollout of the step at once, or the explicit budget
    (``train.kv_cache_gb``) when that is smaller (the rest queue in the engine)."""
    whole = sequences * seq_tokens * kv_per_token
    formula = f"{sequences} seqs x {seq_tokens} tokens x 2 x L x kv_dim x 2 B"
    if budget_gb is not None and budget_gb * 2**30 < whole:
        concurrent = int(budget_gb * 2**30 // (seq_tokens * kv_per_token))
        formula = f"train.kv_cache_gb {budget_gb:g} GiB (~{concurrent} of {sequences} seqs at once; {formula} = all)"
        whole = int(budget_gb * 2**30)
    return Component("rollout kv cache", whole, formula, ("rollout",))


def load_family_preset(name: str, repo: str | Path | None = None) -> dict:
    """config/families/<name>.yaml, validated (as the workflow reads it)."""
    from opdgeom.config import load_family

    root = Path(repo) if repo else Path(__file__).resolve().parents[3]
    return load_family(name, root / "config" / "families", root / "workflow" / "schemas" / "family.schema.yaml")


def check_fits(family: dict | str, gpus: int, gpu_mem_gb: float, **options) -> MemoryPlan:
    """The plan, or ValueError naming the family, the GPUs and the largest components when it does not fit.

    For planning time: call it before any job is submitted (``options`` as for ``plan``)."""
    preset = load_family_preset(family) if isinstance(family, str) else family
    result = plan(preset, gpus, gpu_mem_gb, **options)
    if not result.fits:
        raise ValueError(
            f"family {result.family!r} does not fit {gpus} x {gpu_mem_gb:g} GB: {result.overflow()}; "
            "use more GPUs (train_resources) or larger ones"
        )
    return result


def main(family: str, gpus: int, gpu_mem_gb: float, as_json: bool = False) -> str:
    """What ``opdgeom memory-plan`` prints (it never refuses: the verdict is in the output)."""
    result = plan(load_family_preset(family), gpus, gpu_mem_gb)
    return json.dumps(result.to_json(), indent=2) if as_json else result.render()
