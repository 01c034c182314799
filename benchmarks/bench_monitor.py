"""The live channel monitor's cost, as a share of a training step (issue 26's target: at most 5% of step
time at the default ``every``).

1. Tiny scale, measured end to end: a real tiny OPD run (``opdgeom train``) with the monitor every
   ``--every`` steps and the TensorBoard tracker; the run's own log lines give each call's seconds and
   the mean step time (``geometry step N: ... (0.01s, 1.2% of a step)``).
2. Qwen3-8B layer shapes, one layer, this machine: one monitor call over the seven matrices of one
   decoder layer (q, k, v, o, gate, up, down at the real shapes, a random low-rank-plus-noise update)
   against one decoder layer's forward + backward over ``--tokens`` tokens (bf16 autocast off on CPU:
   fp32), the per-layer share of a step. On a GPU (``--gpu``) both run there.

    python benchmarks/bench_monitor.py [--every 10] [--tokens 4096] [--figure docs/watch.png]

``--figure`` also draws the tiny run's curves as TensorBoard holds them (read back from its event
files with TensorBoard's own reader), the picture in docs/watch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opdgeom.geometry.live import ChannelMonitor, MonitorSettings
from opdgeom.models import build_model, save_model
from opdgeom.tasks import MathTask, split, write_jsonl
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.train.memory_plan import HUB_SHAPES

TINY = {
    "source": "build", "architecture": "qwen3", "hidden_size": 64, "intermediate_size": 192,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip


def tiny_run(work: Path, steps: int, every: int) -> tuple[list[float], list[float], Path]:
    """(monitor call seconds, step-share fractions, run folder) of a real tiny OPD run."""
    tok = build_char_tokenizer()
    save_model(build_model(TINY, tok, seed=0), tok, work / "init")
    save_model(build_model(TINY, tok, seed=1), tok, work / "teacher")
    train, _ = split(MathTask(), 256, 8, seed=0)
    write_jsonl(work / "train.jsonl", train)
    spec = {"name": "monitored", "method": "opd", "init": "student", "domain": "math", "train": {
        "steps": steps, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 2, "grad_clip": 1.0,
        "checkpoint_every": every, "max_new_tokens": 24, "temperature": 1.0, "group_size": 4}}  # fmt: skip
    cmd = [sys.executable, "-m", "opdgeom", "train", "--spec", json.dumps(spec), "--init", str(work / "init"),
           "--teacher", str(work / "teacher"), "--train-data", str(work / "train.jsonl"), "--out", str(work / "run"),
           "--monitor-every", str(every), "--tracker", "tensorboard"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    calls = [(float(s), float(f) / 100) for s, f in re.findall(r"\((\d+\.\d+)s, (\d+\.\d+)% of a step\)", proc.stderr)]
    return [s for s, _ in calls], [f for _, f in calls], work / "run"


def layer_8b(device: str, tokens: int, every: int) -> dict:
    """One monitor call on one Qwen3-8B layer's matrices vs that layer's forward + backward."""
    import dataclasses

    import transformers

    from opdgeom.train.memory_plan import meta_model

    shape = dataclasses.replace(HUB_SHAPES["Qwen/Qwen3-8B-Base"], num_hidden_layers=1, vocab_size=128)
    config = meta_model(shape).config
    torch.manual_seed(0)
    with torch.device(device):
        layer = transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer(config, layer_idx=0)
    monitor = ChannelMonitor(_Named(layer), MonitorSettings(every=every), 100, [20, 100])
    with torch.no_grad():
        for p in layer.parameters():
            if p.ndim == 2:
                u, v = torch.randn(p.shape[0], 8, device=device), torch.randn(8, p.shape[1], device=device)
                p.add_(1e-3 * (u @ v) / 8 + 1e-4 * torch.randn_like(p))
    _sync(device)
    t0 = time.perf_counter()
    monitor.observe(_Named(layer), 20)
    _sync(device)
    monitor_s = time.perf_counter() - t0
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, requires_grad=True)
    rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(config).to(device)
    positions = torch.arange(tokens, device=device)[None]
    embeddings = rotary(hidden, positions)
    t0 = time.perf_counter()
    out = layer(hidden, position_embeddings=embeddings, attention_mask=None)
    (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
    _sync(device)
    step_s = time.perf_counter() - t0
    return {"monitor_s": monitor_s, "layer_fwd_bwd_s": step_s, "share_per_call": monitor_s / step_s,
            "share_at_every": monitor_s / (step_s * every)}  # fmt: skip


class _Named(torch.nn.Module):
    """The layer under the names a model gives its layer matrices (model.layers.0.*)."""

    def __init__(self, layer):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def draw(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = ["train/reverse_kl", "train/grad_norm", "geometry/relative_update_norm", "geometry/bf16_visible_fraction",
            "geometry/stable_rank", "geometry/subspace_similarity_to_reference"]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5), constrained_layout=True)
    for ax, tag in zip(axes.flat, tags):
        series = events.Scalars(tag)
        ax.plot([e.step for e in series], [e.value for e in series], marker="o" if "geometry" in tag else None, ms=3)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("a tiny OPD run as TensorBoard holds it (read back from its event files)", fontsize=11)
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=10, help="the monitor's interval (steps)")
    ap.add_argument("--steps", type=int, default=40, help="steps of the tiny run")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the 8B layer's forward + backward")
    ap.add_argument("--gpu", action="store_true", help="the 8B layer on the GPU")
    ap.add_argument("--figure", type=Path, help="draw the tiny run's TensorBoard curves here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, shares, run = tiny_run(Path(tmp), args.steps, args.every)
        print(f"tiny (2 x 64-wide layers, OPD, 16 x 4 rollouts of 24 tokens), monitor every {args.every} steps: "
              f"{len(seconds)} calls, median {statistics.median(seconds) * 1e3:.1f} ms = "
              f"{statistics.median(shares):.1%} of a mean step per call, "
              f"{statistics.median(shares) / args.every:.2%} of step time at every={args.every}")  # fmt: skip
        if args.figure:
            draw(run, args.figure)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_monitor: --gpu asked for and no CUDA device here")
    r = layer_8b(device, args.tokens, args.every)
    print(
        f"Qwen3-8B, one layer on {device} ({torch.get_num_threads()} threads): monitor {r['monitor_s']:.2f} s, "
        f"layer forward+backward over {args.tokens} tokens {r['layer_fwd_bwd_s']:.2f} s: "
        f"{r['share_per_call']:.1%} per call, {r['share_at_every']:.2%} of step time at every={args.every}"
    )


if __name__ == "__main__":
    main()
