"""The live update-channel monitor (``geometry.live``) for any ``transformers.Trainer``, TRL's included.

``GeometryCallback`` computes, from the policy's weights in memory every ``every`` optimizer steps (and at
the reference and last steps), per layer matrix: relative_update_norm, bf16_visible_fraction, stable_rank
and subspace_similarity_to_reference (Sim_K to the top-K right subspace of dW at the reference step, the
saved checkpoint nearest ``reference_fraction`` x max_steps), and logs their parameter-weighted means as
``geometry/<metric>`` plus ``geometry/alerts`` (the number of channel alerts, each also a warning on the
``opdgeom`` logger). ``checkpoint_dtype=None`` reads W_t as it is: the Trainer saves fp32 checkpoints of an
fp32 policy, so at a checkpoint step the values are the exact engine's (``geometry.trajectory``) on the
``checkpoint-N`` folder; pass ``torch.bfloat16`` for a run whose checkpoints are exported in bf16.

Reporting: a callback gets no handle on the trainer, and adding keys to ``logs`` in ``on_log`` is too
late (``Trainer.log`` has already copied them into ``state.log_history``, and the ``report_to``
integrations' callbacks run before user callbacks). So the callback keeps a reference to the trainer
(``GeometryCallback(every, trainer=trainer)`` or ``callback.bind(trainer)``) and, in ``on_step_end`` of a
due step, calls the base ``transformers.Trainer.log`` on it: one record in ``state.log_history`` (with
``step``) and an ``on_log`` event to every integration (TensorBoard, W&B, MLflow, ...). The base method,
not the subclass's: TRL trainers override ``log`` to flush their own metric buffers, which must stay with
the Trainer's regular record. The ``should_log`` flag that ``on_log`` clears is restored afterwards.
The last ``geometry.live.Report`` is ``callback.last_report``; every row observed is in ``callback.rows``.

Parallelism: a plain model, or DDP / accelerate-wrapped (unwrapped via ``.module``), on one or more
processes with full replicas (DeepSpeed ZeRO-1/2 too): only the main process (``state.is_world_process_zero``)
observes and logs. FSDP2 (parameters are DTensor row shards): every rank observes its rows, sums go
through an all-reduce, the main process logs (the path ``geometry.live`` is tested on; through a Trainer
it is untested). FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions are not supported (refused at
``on_train_begin``). A resumed run is not supported: the Trainer loads the checkpoint before
``on_train_begin``, so W_0 would be the resumed weights. Observing costs a few products with each
matrix, on the weights' device.
"""

from __future__ import annotations

import logging

import torch
import transformers
from transformers.trainer_utils import SaveStrategy

from opdgeom.geometry.live import METRICS, ChannelMonitor, MonitorSettings

LOG = logging.getLogger("opdgeom")


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value


def saved_steps(args, state, every: int) -> list[int]:
    """The steps the Trainer writes ``checkpoint-N`` at: multiples of the save interval, and max_steps
    (``DefaultFlowCallback`` saves at the end under the "steps" strategy). Under another strategy
    (epoch, best, no) the observed steps stand in for them: multiples of ``every``, and max_steps."""
    if args.save_strategy == SaveStrategy.STEPS and (state.save_steps or 0) > 0:
        every = state.save_steps
    return sorted({*range(every, state.max_steps + 1, every), state.max_steps})


class GeometryCallback(transformers.TrainerCallback):
    """The channel monitor every ``every`` steps; bind it to its trainer (see the module's docstring)."""

    def __init__(self, every: int, k: int = 16, reference_fraction: float = 0.2, checkpoint_dtype=None, trainer=None):
        self.settings = MonitorSettings(
            every=every, k=k, reference_fraction=reference_fraction, checkpoint_dtype=checkpoint_dtype
        )
        self.trainer, self.monitor, self.last_report, self.rows, self.sharded = trainer, None, None, [], False

    def bind(self, trainer) -> GeometryCallback:
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError("GeometryCallback: bind it to its trainer (GeometryCallback(..., trainer=t))")
        model = _unwrap(model)
        params = [p for p in model.parameters() if p.ndim == 2]
        sharded = any(hasattr(p, "device_mesh") for p in params)
        if any(hasattr(p, "ds_id") for p in params) or any(p.numel() == 0 for p in params):
            raise NotImplementedError("GeometryCallback: DeepSpeed ZeRO-3 / FSDP1 flat parameters")
        self.sharded = sharded
        checkpoints = saved_steps(args, state, self.settings.every)
        reduce = {"reduce": _all_reduce} if sharded else {}
        self.monitor = ChannelMonitor(model, self.settings, state.max_steps, checkpoints, **reduce)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.monitor is None or not self.monitor.due(step):
            return control
        if not (self.sharded or state.is_world_process_zero):
            return control
        report = self.monitor.observe(_unwrap(model), step)
        self.last_report = report
        self.rows += report.rows
        if not state.is_world_process_zero:
            return control
        for line in report.alerts:
            LOG.warning(line)
        values = {f"geometry/{metric}": report.summary[metric] for metric in METRICS}
        values["geometry/alerts"] = float(len(report.alerts))
        should_log = control.should_log  # the Trainer's own record of this step is still to come
        transformers.Trainer.log(self.trainer, values)
        control.should_log = should_log
        self.trainer.control.should_log = should_log
        return control
