"""Set up one run from explicit paths (what the workflow's rules pass) and drive the loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opdgeom.manifest import write_manifest
from opdgeom.models import build_model, load_tokenizer, save_model
from opdgeom.rollout.colocate import close_engines
from opdgeom.spec import RunSpec, TrainSettings
from opdgeom.tasks import get_task
from opdgeom.tasks.files import read_jsonl
from opdgeom.tracking import TrackerSettings, open_tracker
from opdgeom.train.behaviour import FrozenPolicy, LaggedPolicy, OnPolicy
from opdgeom.train.distributed import SINGLE, World, barrier, load_sharded, setup, teardown
from opdgeom.train.loop import STATE_DIR, log, train
from opdgeom.train.methods import PolicyGradientMethod, SFTMethod
from opdgeom.train.projection import SubspaceProjection
from opdgeom.train.teacher import TeacherScorer
from opdgeom.train.watch import RunWatch

if TYPE_CHECKING:  # the monitor's modules (geometry: polars, scipy) load only for a monitored run
    from opdgeom.geometry.live import MonitorSettings


def fingerprint(*parts) -> str:
    """Identity of a run's inputs: a saved trainer state is resumed only if this matches."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _clear_stale(run_dir: Path, fp: str) -> None:
    """Prepare ``run_dir`` for the run with fingerprint ``fp``.

    Half-written temporaries of a killed job always go. Checkpoints and trainer state go too when
    they belong to a run with other inputs (the small .fingerprint file says, without loading the
    state), so a manifest never mixes two runs; a matching state is kept for resuming.
    """
    for partial in run_dir.glob(".*.tmp*"):
        _remove(partial)
    marker = run_dir / ".fingerprint"
    if not (marker.exists() and marker.read_text() == fp):
        for stale in [*run_dir.glob("step_*"), run_dir / STATE_DIR]:
            _remove(stale)
        marker.write_text(fp)


def frozen_dtype(settings: TrainSettings) -> torch.dtype:
    """Frozen models (teacher, anchor, lagged copy) follow the compute precision: bf16 or fp32."""
    return torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32


def load_frozen(path: Path, settings: TrainSettings, world: World):
    """A frozen model for scoring or sampling, sharded over the ranks (never whole on one)."""
    return load_sharded(path, world, frozen_dtype(settings), frozen=True)


def make_behaviour(run: RunSpec, init: Path, world: World):
    """Who samples: the policy itself, the frozen init (the SFT anchor), or a lagged copy of the
    policy (a frozen model sharded like it, refreshed from its shards every ``lag`` steps)."""
    if run.behaviour is None:
        return OnPolicy()
    if run.behaviour.policy == "anchor":
        return FrozenPolicy(load_frozen(init, run.train, world))
    return LaggedPolicy(load_frozen(init, run.train, world), run.behaviour.lag)


def make_engine(settings: TrainSettings, init: Path, world: World, behaviour=None):
    """The rollout engine: None for transformers generate (default), or this rank's colocated vLLM
    engine (``rollout.colocate.ColocatedRollout``), kept for the whole run: built from ``init``,
    re-synced from the (sharded) behaviour weights whenever they change, asleep during updates.

    Under torchrun every rank holds one whole engine (tensor-parallel 1) that joins the job's process
    group (vLLM's external_launcher) and samples the rank's own prompts. A vLLM build that does not
    match this torch, or an engine that cannot fit beside the trainer, fails here, before step 1.
    Only an engine sampling the frozen anchor (``behaviour.policy == "anchor"``) keeps the weights it
    starts with; every other one is synced before its first rollout, so it starts from vLLM's dummy
    weights instead of reading the init folder a second time.
    """
    if settings.rollout_engine == "hf":
        return None
    if settings.rollout_engine != "vllm":
        raise ValueError(f"rollout_engine must be 'hf' or 'vllm', got {settings.rollout_engine!r}")
    return _colocated_engine(settings, init, world, keeps_init=behaviour is not None and behaviour.policy == "anchor")


def engine_settings(settings: TrainSettings, model_dir: Path, world: World, trainer_dir: Path) -> dict:
    """How an engine over ``model_dir`` is built on this device: dtype, context length, KV cache bytes,
    and the memory check's verdict against the trainer (whose model is ``trainer_dir``). bf16 on GPUs
    (the trainer's compute dtype); fp32 on CPU, where vLLM's bf16 kernels differ from the trainer's
    fp32 by up to 0.15 per token and the equality checks need fp32."""
    import transformers

    from opdgeom.rollout.colocate import check_fits, engine_memory, param_count
    from opdgeom.train.memory_plan import DEFAULT_PROMPT_TOKENS

    config = transformers.AutoConfig.from_pretrained(model_dir)
    trainer_config = transformers.AutoConfig.from_pretrained(trainer_dir)
    # Room for a prompt of up to 2048 tokens plus the rollout, within what the model supports.
    max_model_len = min(config.max_position_embeddings, settings.max_new_tokens + 2048)
    on_gpu = world.device.type == "cuda"
    dtype_bytes = 2 if on_gpu else 4
    sequences = max(1, settings.batch_size * settings.group_size // world.size)
    budget = int(settings.kv_cache_gb * 2**30) if settings.kv_cache_gb is not None else None
    weights, kv = engine_memory(
        config, dtype_bytes, sequences, DEFAULT_PROMPT_TOKENS + settings.max_new_tokens, max_model_len, budget
    )
    verdict = check_fits(param_count(trainer_config), world.size, world.device, weights, kv)
    kwargs = {"dtype": "bfloat16" if on_gpu else "float32", "max_model_len": max_model_len, "kv_cache_bytes": kv}
    if on_gpu:
        import torch

        total = torch.cuda.get_device_properties(world.device).total_memory
        # vLLM refuses to start unless this fraction of the GPU is free: ask for what it will use.
        kwargs["gpu_memory_utilization"] = min(0.9, 1.2 * (weights + kv) / total + 0.02)
    return {"kwargs": kwargs, "verdict": verdict}


def _vllm_engine(role: str, model_dir: Path, settings: TrainSettings, init: Path, world: World, **extra):
    """This rank's colocated engine over ``model_dir`` (checked against the trainer built from ``init``)."""
    from opdgeom.rollout.colocate import check_vllm_build

    build = check_vllm_build()  # before vllm is imported: a torch mismatch says what to install
    from opdgeom.rollout.vllm_engine import VLLMEngine  # needs .venv-vllm (scripts/vllm_env.sh) or envs/vllm-gpu

    plan = engine_settings(settings, model_dir, world, trainer_dir=init)
    log(f"{role} engine: vLLM ({build}), {world.size} colocated engine(s), {plan['verdict']}")
    return VLLMEngine(model_dir, colocated=world.size > 1, seed=world.rank, **plan["kwargs"], **extra)


def _colocated_engine(settings: TrainSettings, init: Path, world: World, keeps_init: bool):
    from opdgeom.rollout.colocate import ColocatedRollout

    load = {} if keeps_init else {"load_format": "dummy"}
    engine = _vllm_engine("rollout", init, settings, init, world, **load)
    return ColocatedRollout(engine, rank=world.rank, holds_init=keeps_init)


def make_teacher_engine(settings: TrainSettings, teacher: Path, init: Path, world: World):
    """The teacher on a colocated vLLM engine per rank (TP 1), as PolicyGradientMethod's ``teacher``
    callable: prompt log-probs of the completion tokens (``colocate.engine_teacher``), the same
    quantity the transformers teacher gives at the positions OPD reads. Worth it where the teacher
    fits one GPU beside the trainer (the pilot's 4B teacher: 8 GB bf16); a 32B teacher needs tensor
    parallelism over the node, which this does not do yet."""
    from opdgeom.rollout.colocate import engine_teacher

    return engine_teacher(_vllm_engine("teacher", teacher, settings, init, world))


def make_method(run: RunSpec, tokenizer, examples, init: Path, teacher_path, seed: int, world: World = SINGLE):
    """The run's method, with its teacher and behaviour models loaded (sharded under torchrun)."""
    if run.method == "sft":
        return SFTMethod(tokenizer, examples, run.train.batch_size, seed, world)
    teacher = None
    if teacher_path and run.train.teacher_engine == "vllm":
        if run.teacher_prompt_format != "raw":
            raise ValueError(
                f"run {run.name!r}: teacher_engine vllm scores the student's rows as they are; "
                f"the teacher's prompt_format must be raw, not {run.teacher_prompt_format!r}"
            )
        on_engine = make_teacher_engine(run.train, Path(teacher_path), init, world)

        def teacher(prompts, prompt_ids, completion_ids, batch):  # the rows are already the teacher's
            return on_engine(batch)

    elif teacher_path:
        teacher_model = load_frozen(teacher_path, run.train, world)
        teacher = TeacherScorer(
            teacher_model, tokenizer, teacher_path, run.teacher_prompt_format, run.train.micro_batch_tokens, world
        )
    return PolicyGradientMethod(
        tokenizer,
        examples,
        get_task(run.domain),
        run,
        seed,
        teacher=teacher,
        behaviour=make_behaviour(run, init, world),
        world=world,
        engine=make_engine(run.train, init, world, run.behaviour),
    )


def train_run(
    run: RunSpec,
    init: Path,
    train_data: Path,
    out_dir: Path,
    seed: int,
    teacher: Path | None = None,
    projection_basis: Path | None = None,
    tracker: TrackerSettings | None = None,
    monitor: MonitorSettings | None = None,
) -> Path:
    """Train ``run`` from ``init``; write checkpoints and manifest.

    ``projection_basis``: the subspace file (``opdgeom basis``) of a subspace-projected run.
    ``tracker``: where the per-step numbers go besides the log (rank 0 only; default none);
    ``monitor``: the live channel geometry every ``monitor.every`` steps (``monitor.parquet``).
    """
    init, train_data, out_dir = Path(init), Path(train_data), Path(out_dir)
    world = setup(one_rank_group=run.train.mixed_precision == "bf16")
    fp = fingerprint(run.to_json(), str(init), str(train_data), str(teacher), str(projection_basis), seed)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale(out_dir, fp)
    barrier(world)
    tokenizer = load_tokenizer(init)
    # fp32 master weights, each rank loading only its shards (FSDP2 under torchrun).
    s = run.train
    model = load_sharded(
        init,
        world,
        torch.float32,
        mixed_precision=s.mixed_precision,
        activation_checkpointing=s.activation_checkpointing,
    )
    examples = read_jsonl(train_data)
    method = make_method(run, tokenizer, examples, init, teacher, seed, world)
    projection = None
    if run.projection:
        if projection_basis is None:
            raise ValueError(f"run {run.name!r} asks for a projection but no --projection-basis file was given")
        projection = SubspaceProjection.from_file(model, projection_basis, run.projection.mode, world)
    log(
        f"run {run.name}: method={run.method} init={init} examples={len(examples)} "
        f"steps={run.train.steps} device={world.device} world={world.size}"
    )
    tracking = open_tracker(tracker or TrackerSettings(), run.name, out_dir, run.to_json(), world.rank)
    watch = RunWatch(model, run.train.steps, run.train.checkpoint_steps, out_dir, tracking, monitor, world)
    try:
        records = train(model, tokenizer, method, run.train, out_dir, fp, projection, world, watch)
    finally:
        watch.close()
    extra = {}
    if projection is not None:
        energy = projection.energy_outside()  # a collective under torchrun: before teardown, on every rank
        log(f"update energy outside the rank-{run.projection.rank} subspace: {energy['total']:.3e}")
        extra["projection"] = {**dataclasses.asdict(run.projection), "energy_outside": energy}
    close_engines()  # vLLM's shutdown takes its groups and torch's default one: after the last collective
    teardown(world)
    if not world.is_main:
        return out_dir / "manifest.json"
    return write_manifest(out_dir, run.to_json(), init, records, extra)


def build_and_pretrain(spec: dict, pretrain: dict, tokenizer_dir: Path, corpus: Path, out_dir: Path, seed: int) -> Path:
    """A tiny model from its config, briefly pretrained on the generic corpus (learned spectrum)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(spec, tokenizer, seed)
    examples = read_jsonl(corpus)
    steps = pretrain["steps"]
    # Pretraining is SFT on the corpus: the rollout fields of the settings are never read.
    settings = TrainSettings(
        steps=steps, batch_size=pretrain["batch_size"], lr=pretrain["lr"], weight_decay=0.0,
        warmup_steps=max(1, steps // 20), grad_clip=1.0, checkpoint_every=steps, max_new_tokens=1,
        temperature=1.0, group_size=1,
    )  # fmt: skip
    work_dir = out_dir.parent / f".{out_dir.name}.pretrain"
    fp = fingerprint(spec, pretrain, str(corpus), seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale(work_dir, fp)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining {spec['architecture']} ({n_params / 1e6:.2f}M parameters) for {pretrain['steps']} steps")
    method = SFTMethod(tokenizer, examples, pretrain["batch_size"], seed)
    train(model, tokenizer, method, settings, work_dir, fp)
    save_model(model, tokenizer, out_dir)
    shutil.rmtree(work_dir)
    return out_dir
