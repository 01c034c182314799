"""The cluster path end to end, at real layer shapes, in minutes: what the 8B study's first hour runs.

A student with Qwen3-8B's layers and a teacher with Qwen3-32B's (``--layers`` / ``--teacher-layers``
each, the full 151,936-token vocabulary, random weights built from the configs: no hub) go through
the package's own jobs, launched as the workflow launches them:

1. ``opdgeom train`` under torchrun (``launch.launch_command``; one rank per GPU, up to ``--ranks``):
   OPD with top-KL token selection, bf16 FSDP2 with activation checkpointing, ``micro_batch_tokens``
   small enough that every scoring pass and the loss run several micro-batches, the teacher sharded
   over the ranks, rollouts on colocated vLLM engines (asleep during the update, synced after it);
2. ``opdgeom evaluate`` on the run's checkpoints with the teacher, in its three phases: avg@k answers
   (T 0.6, top-p 0.95) and samples on a vLLM engine at the hub presets' length (8192 new tokens on
   GPUs), the teacher alone, then the student with the reverse KL.

It prints each job's wall time, peak GPU memory (nvidia-smi, polled), the training log's step lines
(tokens/s) and exits non-zero if a job fails. Record what it prints in benchmarks/RESULTS.md.

    python benchmarks/gpu_smoke.py                 # on a GPU node, in the vLLM environment
    python benchmarks/gpu_smoke.py --cpu-smoke     # tiny shapes, 2 gloo ranks, transformers engines
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from opdgeom.launch import launch_command
from opdgeom.models import save_model
from opdgeom.tasks import MathTask, split, write_jsonl
from opdgeom.tokenizer import build_char_tokenizer
from opdgeom.train.memory_plan import HUB_SHAPES, ModelShape, meta_model

TINY = ModelShape("qwen3", 64, 2, 2, 1, 32, 128, 512, False)


def wide_char_tokenizer(vocab_size: int):
    """The character tokenizer with filler tokens up to ``vocab_size``: every id the model can sample
    decodes (to a filler string), so engines and verifiers see the full vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = build_char_tokenizer()
    vocab = dict(base.get_vocab())
    vocab.update({f"<|f{i}|>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=base.unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    special = {k: getattr(base, k) for k in ("pad_token", "bos_token", "eos_token", "unk_token")}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="left", clean_up_tokenization_spaces=False,
        split_special_tokens=True, **special,
    )  # fmt: skip


def build_folder(shape: ModelShape, layers: int, tokenizer, out: Path, seed: int, device: str) -> Path:
    """A random model of ``shape`` with ``layers`` decoder layers, saved as a bf16 HF folder."""
    import transformers

    config = meta_model(dataclasses.replace(shape, num_hidden_layers=layers)).config
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.max_position_embeddings = 16384  # room for a prompt and an 8192-token generation
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_model(model, tokenizer, out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


class GpuMemoryPoll:
    """Peak memory used on the node's GPUs (nvidia-smi every 0.2 s) while a job runs, in GiB."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                used = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mib = max(self.peak_mib, *(int(u) for u in used))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_job(name: str, cmd: str, log: Path, on_gpu: bool, timeout: int) -> dict:
    """One job through bash (as a rule's shell runs it); its stderr goes to ``log``."""
    # This interpreter's environment first on PATH: the job's `python` and `torchrun` are its own.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as err, GpuMemoryPoll() if on_gpu else _NoPoll() as poll:
        proc = subprocess.run(["bash", "-c", cmd], stdout=err, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    peak = poll.peak_mib / 1024 if on_gpu else None
    return {"job": name, "returncode": proc.returncode, "wall_s": wall, "peak_gib": peak, "log": log}


class _NoPoll:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="student decoder layers (Qwen3-8B shapes)")
    parser.add_argument("--teacher-layers", type=int, default=2, help="teacher decoder layers (Qwen3-32B shapes)")
    parser.add_argument("--ranks", type=int, default=2, help="training ranks (at most one per visible GPU)")
    parser.add_argument("--steps", type=int, default=3, help="OPD steps")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="rollout and evaluation length")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024, help="tokens per forward/backward pass")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per job")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (tests the path only)")
    parser.add_argument(
        "--engine", choices=["vllm", "hf"], help="rollout and evaluation engine (default: vllm on GPUs, hf on CPU)"
    )
    parser.add_argument("--score-tokens", type=int, default=8192, help="evaluate's padded tokens per teacher pass")
    parser.add_argument(
        "--eval-max-new-tokens", type=int,
        help="the evaluate job's generation length (default 8192 on GPUs; --max-new-tokens on CPU)",
    )  # fmt: skip
    parser.add_argument("--eval-k", type=int, default=4, help="the evaluate job's avg@k samples per problem")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.cpu_smoke:
        print(f"gpu_smoke: no CUDA GPU on {os.uname().nodename}; nothing measured (--cpu-smoke runs the path)")
        return 2
    ranks = min(args.ranks, torch.cuda.device_count()) if on_gpu else args.ranks
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_smoke."))
    out.mkdir(parents=True, exist_ok=True)
    student_shape, teacher_shape = (TINY, TINY) if args.cpu_smoke else (
        HUB_SHAPES["Qwen/Qwen3-8B-Base"], HUB_SHAPES["Qwen/Qwen3-32B"]
    )  # fmt: skip
    device = "cuda" if on_gpu else "cpu"
    tokenizer = wide_char_tokenizer(student_shape.vocab_size)
    t0 = time.perf_counter()
    student = build_folder(student_shape, args.layers, tokenizer, out / "student", seed=0, device=device)
    teacher = build_folder(teacher_shape, args.teacher_layers, tokenizer, out / "teacher", seed=1, device=device)
    train, held_out = split(MathTask(), 256, 32, seed=0)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    print(f"models and data: {time.perf_counter() - t0:.1f} s in {out}")

    engine = args.engine or ("vllm" if on_gpu else "hf")
    spec = {
        "name": "smoke", "method": "opd", "init": "student", "domain": "math",
        "token_mask": {"select": "top", "keep": 0.5},
        "train": {
            "steps": args.steps, "batch_size": 8 * ranks, "lr": 1e-6, "weight_decay": 0.0, "warmup_steps": 1,
            "grad_clip": 1.0, "checkpoint_every": args.steps, "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0, "group_size": 4, "rollout_engine": engine, "teacher_engine": "hf",
            "micro_batch_tokens": args.micro_batch_tokens, "mixed_precision": "bf16",
            "activation_checkpointing": True,
        },
    }  # fmt: skip
    train_cmd = (
        f"{launch_command(1, ranks)} -m opdgeom train --spec '{json.dumps(spec)}' --init {student} "
        f"--teacher {teacher} --train-data {out / 'train.jsonl'} --out {out / 'run'}"
    )
    eval_new = args.eval_max_new_tokens or (8192 if on_gpu and not args.cpu_smoke else args.max_new_tokens)
    eval_cmd = (
        f"python -m opdgeom evaluate --manifest {out / 'run' / 'manifest.json'} --ref smoke "
        f"--eval-data {out / 'eval.jsonl'} --domain math --max-new-tokens {eval_new} --batch-size 32 "
        f"--k {args.eval_k} --accuracy-temperature 0.6 --top-p 0.95 "
        f"--teacher {teacher} --samples 2 --engine {engine} --score-tokens {args.score_tokens} "
        f"--out {out / 'eval.parquet'}"
    )
    results = []
    for name, cmd in (("train", train_cmd), ("evaluate", eval_cmd)):
        result = run_job(name, cmd, out / f"{name}.log", on_gpu, args.timeout)
        results.append(result)
        if result["returncode"] != 0:
            break

    shapes = (
        "tiny shapes"
        if args.cpu_smoke
        else (f"student {args.layers} x Qwen3-8B layers, teacher {args.teacher_layers} x Qwen3-32B layers")
    )
    where = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    print(f"\ngpu_smoke on {where}: {shapes}, {ranks} rank(s), {args.steps} OPD steps, "
          f"micro_batch_tokens {args.micro_batch_tokens}, engines {engine}")  # fmt: skip
    for line in (out / "train.log").read_text().splitlines():
        if line.startswith(("step ", "rollout engine", "run ")):
            print(f"  {line}")
    print("| job | exit | wall s | peak GPU GiB |\n|---|---:|---:|---:|")
    for r in results:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['job']} | {r['returncode']} | {r['wall_s']:.1f} | {peak} |")
    failed = [r for r in results if r["returncode"] != 0]
    for r in failed:
        print(f"\n{r['job']} failed; the end of {r['log']}:\n" + "\n".join(r["log"].read_text().splitlines()[-40:]))
    return 1 if failed or len(results) < 2 else 0


if __name__ == "__main__":
    sys.exit(main())
