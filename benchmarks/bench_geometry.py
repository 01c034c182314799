"""Benchmark the geometry engine against a naive implementation on Qwen3-8B matrix shapes.

Builds a synthetic bf16 checkpoint pair (per layer: q/o 4096x4096, k/v 1024x4096,
gate/up 12288x4096, down 4096x12288, plus norms), then times in separate processes
(so each peak RSS is its own):

- naive (the issue's baseline): load both state dicts whole, and every metric by its own float32
  full SVD (left and right principal angles: an SVD of W0 and of W1 each; NSS: singular values
  of W0 and W1; principal mask: SVD of W0), whole-tensor float32 sparsity, topk masks, no cache;
- engine cold: opdgeom.geometry.compare_checkpoints(A, B) with an empty statistics cache;
- engine second: compare_checkpoints(A, C), a second tuned checkpoint of the same base, on the
  cache the cold run filled (the base's statistics are reused);
- engine warm: compare_checkpoints(A, B) again on the filled cache.
Each engine run counts its spectral decompositions (calls of spectral.spectrum): warm must be 0.

Prints times, ratios, peak memory and how far the naive float32 numbers are from the
engine's float64 ones. Usage: python benchmarks/bench_geometry.py [--layers 2] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (12288, 4096),
    "mlp.up_proj": (12288, 4096),
    "mlp.down_proj": (4096, 12288),
}
VECTORS = {"input_layernorm": 4096, "post_attention_layernorm": 4096, "self_attn.q_norm": 128, "self_attn.k_norm": 128}
ALPHA = 0.05
ETA = 1e-3


def build_pair(
    folder: Path, layers: int, seed: int = 0, scale: int = 1, device: str = "cpu"
) -> tuple[Path, Path, Path]:
    """W0 = N(0, 0.02^2) bulk + 32 separated spikes; W1 = W0 + rank-8 drift + noise on 30% of entries;
    W2 (a second tuned checkpoint) = W0 + another drift and noise draw.

    The spikes give W0 a well separated top of the spectrum, as trained weights have, so
    top-16 subspaces are well defined; all stored in bf16 like a short training run. ``device``
    draws the random matrices there (a GPU builds a 36-layer pair in seconds; other numbers).
    """
    gen = torch.Generator(device).manual_seed(seed)
    state_a, state_b, state_c = {}, {}, {}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def bf16(w: torch.Tensor) -> torch.Tensor:
        return w.to(torch.bfloat16).cpu()

    for layer in range(layers):
        for module, (m, n) in SHAPES.items():
            m, n = m // scale, n // scale  # --scale shrinks every matrix for a quick check of the script
            name = f"model.layers.{layer}.{module}.weight"
            bulk_edge = 0.02 * (math.sqrt(m) + math.sqrt(n))
            spikes_r = bulk_edge * (2 + 30 / torch.arange(1, 33, dtype=torch.float32, device=device))
            u_mr = randn(m, 32) / math.sqrt(m)
            v_nr = randn(n, 32) / math.sqrt(n)
            w0 = 0.02 * randn(m, n) + (u_mr * spikes_r) @ v_nr.T
            drift = randn(m, 8) @ randn(8, n) * 2e-5
            touched = torch.rand(m, n, generator=gen, device=device) < 0.3
            w1 = w0 + drift + touched * 2e-4 * randn(m, n)
            drift2 = randn(m, 8) @ randn(8, n) * 2e-5
            w2 = w0 + drift2 + touched * 2e-4 * randn(m, n)
            state_a[name], state_b[name] = bf16(w0), bf16(w1)
            state_c[name] = bf16(w2)
        for module, n in VECTORS.items():
            name = f"model.layers.{layer}.{module}.weight"
            w0 = 1 + 0.1 * randn(n)
            state_a[name] = bf16(w0)
            state_b[name] = bf16(w0 + 1e-3 * randn(n))
            state_c[name] = bf16(w0 + 1e-3 * randn(n))
    dirs = folder / "a", folder / "b", folder / "c"
    for d, state in zip(dirs, (state_a, state_b, state_c)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "model.safetensors"))
    return dirs


def naive(dir_a: Path, dir_b: Path, k: int) -> dict:
    """What one writes first: whole state dicts, float32 torch.linalg.svd, whole-tensor temporaries.

    One script per metric of the public API, each doing its own decompositions:
    principal_angles(side="left") and (side="right") a full SVD of W0 and of W1 each,
    spectral_shift the singular values of W0 and of W1, mask_overlap a full SVD of W0.
    The seconds spent in the right-side angle SVDs are reported apart, so the ratio against
    a baseline that shares one SVD pair between both sides can be read off too.
    """
    state_a, state_b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    out = {"__naive__": {"right_angle_seconds": 0.0}}
    for name, a in state_a.items():
        w0, w1 = a.float(), state_b[name].float()
        unchanged = ((w1 - w0).abs() <= ETA * torch.maximum(w0.abs(), w1.abs())).float().mean().item()
        if w0.dim() != 2:
            out[name] = {"bf16_sparsity": unchanged}
            continue
        u0, _, _ = torch.linalg.svd(w0, full_matrices=False)
        u1, _, _ = torch.linalg.svd(w1, full_matrices=False)
        left = torch.rad2deg(torch.arccos(torch.linalg.svdvals(u0[:, :k].T @ u1[:, :k]).clamp(max=1)))
        start = time.perf_counter()
        _, _, v0t = torch.linalg.svd(w0, full_matrices=False)
        _, _, v1t = torch.linalg.svd(w1, full_matrices=False)
        out["__naive__"]["right_angle_seconds"] += time.perf_counter() - start
        right = torch.rad2deg(torch.arccos(torch.linalg.svdvals(v0t[:k] @ v1t[:k].T).clamp(max=1)))
        s0, s1 = torch.linalg.svdvals(w0), torch.linalg.svdvals(w1)
        um, sm, vmt = torch.linalg.svd(w0, full_matrices=False)
        recon = ((um[:, :k] * sm[:k]) @ vmt[:k]).abs().reshape(-1)
        count = max(1, round(ALPHA * recon.numel()))
        changed = ((w1 - w0).abs() > ETA * torch.maximum(w0.abs(), w1.abs())).reshape(-1)
        principal = torch.zeros_like(changed)
        principal[recon.topk(count).indices] = True
        out[name] = {
            "bf16_sparsity": unchanged,
            "spectral_shift": ((s1 - s0).norm() / s0.norm()).item(),
            "principal_angle_left_max": left.max().item(),
            "principal_angle_right_max": right.max().item(),
            "mask_overlap_principal": (principal & changed).sum().item() / max(1, changed.sum().item()),
        }
    return out


def engine(dir_a: Path, dir_b: Path, k: int, cache: Path, device: str) -> dict:
    import opdgeom.geometry.compare as compare

    calls = {"n": 0}
    real_spectrum = compare.spectrum

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_spectrum(*args, **kwargs)

    compare.spectrum = counted  # count decompositions: a warm cache must need none
    table = compare.compare_checkpoints(dir_a, dir_b, k=k, alpha=ALPHA, eta=ETA, cache=cache, device=device)
    out = {"__spectra__": {"count": calls["n"]}}
    for row in table.iter_rows(named=True):
        out.setdefault(row["tensor"], {})[row["metric"]] = row["value"]
    return out


def child(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.mode == "naive":
        values = naive(args.dir_a, args.dir_b, args.k)
    else:
        values = engine(args.dir_a, args.dir_b, args.k, args.cache, args.device)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_gb": peak_rss_gb(), "values": values}))


def peak_rss_gb() -> float:
    """This process's peak RSS. ru_maxrss would be wrong here: Linux carries the parent's
    high-water mark into a fork+exec child (the parent holds the whole synthetic pair while
    building it), while VmHWM belongs to the exec'd image alone."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_mode(mode: str, dir_a: Path, dir_b: Path, k: int, cache: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--dir-a", str(dir_a), "--dir-b", str(dir_b)]
    cmd += ["--k", str(k), "--cache", str(cache), "--device", device]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def worst_gap(naive_values: dict, engine_values: dict, metric: str, relative: bool) -> float:
    gaps = []
    for name, values in naive_values.items():
        if metric in values and metric in engine_values.get(name, {}):
            ref = engine_values[name][metric]
            gap = abs(values[metric] - ref)
            gaps.append(gap / abs(ref) if relative and ref else gap)
    return max(gaps) if gaps else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic pair goes (default: temp)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--scale", type=int, default=1, help="divide every matrix dimension (quick check only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engine's spectra run")
    parser.add_argument("--build-device", default="cpu", help="where the synthetic matrices are drawn")
    parser.add_argument("--engine-modes", default="cold,second,warm", help="engine runs to time, in order")
    parser.add_argument("--mode", choices=["naive", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--dir-a", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dir-b", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dir_a, dir_b, dir_c = build_pair(tmp, args.layers, scale=args.scale, device=args.build_device)
        size_gb = sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 2**30
        print(
            f"synthetic pair: {args.layers} layer(s), {size_gb:.2f} GiB on disk, "
            f"built in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        results = {}
        tuned = {"cold": dir_b, "second": dir_c, "warm": dir_b}
        wanted = args.engine_modes.split(",")
        if wanted[0] != "cold" or not set(wanted) <= set(tuned):
            parser.error("--engine-modes: cold first, then any of second, warm")
        modes = [(f"engine_{name}", "engine", tuned[name]) for name in wanted]
        if not args.skip_naive:
            modes.insert(0, ("naive", "naive", dir_b))
        for label, mode, tuned_dir in modes:
            results[label] = run_mode(mode, dir_a, tuned_dir, args.k, tmp / "cache", args.device)
            spectra = results[label]["values"].pop("__spectra__", {}).get("count", "-")
            print(
                f"{label:13s} {results[label]['seconds']:8.1f} s   peak RSS {results[label]['peak_gb']:.2f} GiB"
                f"   spectral decompositions {spectra}",
                flush=True,
            )
        cold, second, warm = (results.get(f"engine_{name}") for name in ("cold", "second", "warm"))
        if second:
            print(
                f"second tuned checkpoint (base cached) speed-up over cold: {cold['seconds'] / second['seconds']:.1f}x"
            )
        if warm:
            print(f"warm cache speed-up over cold: {cold['seconds'] / warm['seconds']:.1f}x")
        if "naive" in results:
            base = results["naive"]
            shared = base["seconds"] - base["values"].pop("__naive__")["right_angle_seconds"]
            print(f"engine cold speed-up over naive: {base['seconds'] / cold['seconds']:.1f}x")
            print(
                f"  (over a naive run sharing one SVD pair between left and right angles, {shared:.1f} s:"
                f" {shared / cold['seconds']:.1f}x)"
            )
            if warm:
                print(f"engine warm speed-up over naive: {base['seconds'] / warm['seconds']:.1f}x")
            print(f"peak memory naive / engine: {base['peak_gb'] / cold['peak_gb']:.1f}x")
            for metric, relative in (
                ("spectral_shift", True),
                ("principal_angle_left_max", False),
                ("principal_angle_right_max", False),
                ("bf16_sparsity", False),
                ("mask_overlap_principal", False),
            ):
                gap = worst_gap(base["values"], cold["values"], metric, relative)
                kind = "relative" if relative else "absolute"
                print(f"naive float32 vs engine float64, worst {kind} gap in {metric}: {gap:.3g}")
        if warm:
            same = all(
                cold["values"][t][m] == warm["values"][t][m]
                or (math.isnan(cold["values"][t][m]) and math.isnan(warm["values"][t][m]))
                for t in cold["values"]
                for m in cold["values"][t]
            )
            print(f"warm results identical to cold: {same}")
        nss = [v["spectral_shift"] for v in cold["values"].values() if "spectral_shift" in v]
        angles = [v["principal_angle_left_max"] for v in cold["values"].values() if "principal_angle_left_max" in v]
        print(f"engine: NSS {min(nss):.2e}..{max(nss):.2e}, max left angle {min(angles):.3g}..{max(angles):.3g} deg")


if __name__ == "__main__":
    main()
