"""This project's OPD and RLVR jobs against TRL 1.16's trainers on the same work (issue 28, item 1).

Pairs, each side a fresh process (start-up measured as a user sees it), alternating
ours, TRL, ours, TRL ... for ``--rounds`` rounds:

- OPD:  ``python -m opdgeom train`` (method ``opd``) vs ``trl.DistillationTrainer`` (TRL 1.16's on-policy
  distillation trainer, ``trl/trainer/distillation_trainer.py``; the GKDTrainer moved to
  ``trl.experimental.gkd``; DistillationTrainer always samples from the student, i.e. GKD's lmbda=1).
- RLVR: ``python -m opdgeom train`` (method ``rlvr``) vs ``trl.GRPOTrainer``, the reward being the same
  ``MathTask.verify`` of the decoded completion against the example's answer.

The same work on both sides: the student is a 2-layer Qwen3 (hidden 64, intermediate 128, 2 heads of 32,
1 KV head, untied lm_head, the 100-token character vocabulary) built with seed 0 and saved as an fp32
folder; the teacher has the same shapes, seed 1 (random weights: this measures cost, not learning).
16 prompts x 4 samples per step, 40 new tokens, temperature 1 (no top-k/top-p), 20 steps, fp32, one
process, OMP_NUM_THREADS=2 and torch.set_num_threads(2) in every child, AdamW(lr, betas (0.9, 0.95),
eps 1e-8, weight decay 0), gradient clipping at 1.0, and the same schedule: TRL is handed an optimizer and
a LambdaLR built from ``opdgeom.train.loop.lr_lambda(0, steps)`` (no warmup, cosine to 10%), so TRL's own
warmup/linear-decay defaults are not in play. BOS: our prompts are BOS + characters
(``tokens.encode_prompt``); the char tokenizer adds no special tokens, so the TRL child gives it a
post-processor that prepends BOS: TRL's prompt ids are then the same BOS + characters.

How each phase is measured. Both children run in benchmarks/vs_trl_children.py so that timers can be wrapped
around the phases; the code that runs is the user's (``opdgeom.cli.main(["train", ...])``, or a TRL
trainer's ``train()``), the wrappers add a perf_counter pair per call. Ours runs through
``opdgeom.__main__.run`` (the collector settings and exit of ``python -m opdgeom``); TRL's child exits as a
script does.

- start-up: the parent's launch time (before Popen) to the first step's start (ours: the first
  ``PolicyGradientMethod.batch`` call; TRL: ``on_step_begin`` of a TrainerCallback).
- sampling: ours ``HFEngine.sample``; TRL ``trainer._generate`` (tokenisation + ``model.generate``).
- teacher scoring (OPD only): ours ``TeacherScorer.__call__`` (one no-grad forward in ``batch``);
  TRL the teacher's ``_get_last_hidden_state`` call inside ``_compute_loss`` (a no-grad backbone forward;
  its vocabulary projection is done inside the chunked divergence, so it lands in "forward").
- forward: ours ``PolicyGradientMethod.loss``; TRL ``trainer.compute_loss`` less the teacher's share.
- backward: ``torch.Tensor.backward`` (ours) / ``accelerator.backward`` (TRL).
- optimizer: ``AdamW.step`` + ``clip_grad_norm_`` on both sides.
- export/save: ours ``export_hf`` + ``save_trainer_state`` (bf16 HF folder + fp32 weights, AdamW state,
  schedule, DCP) at the last step; TRL ``trainer.save_model`` after ``train()`` (fp32 safetensors only).
- loop: first step start to the last optimizer step's end; "other" = loop less the phases above
  (ours: packing, decoding, rewards, advantages, logging; TRL: dataloader, rewards, advantages,
  padding, logging, callbacks).
- end-to-end: launch to process exit; peak RSS: ``ru_maxrss`` of the child (``os.wait4``).
- tokens/s: generated completion tokens (EOS included, nothing after it) over the loop time.
Our training log lines (``step N/M ... batch_s= step_s=``) are parsed too: "logged step time" is the
sum of step_s (the whole step, optimizer included) and its median over steps 2.. (warm); TRL's side of
those rows is its own ``step_time`` metric, which times ``training_step`` (generation, loss, backward)
but not the optimizer step or clipping.
What cannot be split: TRL's GRPO reward function and advantage computation are inside its sampling
batch preparation (counted in "other"); our rewards and advantages are in "other" too. The TRL teacher's
lm_head projection is fused into its loss kernel (in "forward"), ours is in "teacher".

``--gpu``: the same pairs, the same settings, on the CUDA device at the pilot family's shapes with random
weights (a Qwen3-0.6B-shaped student, a Qwen3-4B-shaped teacher, both over the 100-token character
vocabulary, fp32 on both sides, one process); ``--gpu-student``/``--gpu-teacher`` change the shapes.
Without CUDA it prints "bench_vs_trl --gpu: no CUDA device here; nothing measured" and exits 2. The GPU
body has not been run here (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).resolve().with_name("vs_trl_children.py")

TINY_STUDENT = {
    "source": "build", "architecture": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip
# The pilot family's (config/families/qwen3-pilot.yaml) shapes: Qwen3-0.6B-Base student, Qwen3-4B teacher
# (their config.json values), random weights and the character vocabulary (100 tokens, not 151,936).
GPU_STUDENT = {
    "source": "build", "architecture": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
}  # fmt: skip
GPU_TEACHER = {
    "source": "build", "architecture": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
}  # fmt: skip

DIFFERENCES = [
    "OPD objective: TRL DistillationTrainer (beta=1.0, its default) minimises the full-vocabulary reverse KL "
    "sum_v p_s(v) (log p_s(v) - log p_t(v)) at every completion position (generalised JSD with beta=1; exact "
    "gradient over the vocabulary, chunked lm_head kernel); ours is the sampled-token policy gradient "
    "-sum_t A_t log pi_s(y_t) / N with A_t = -(log pi_s(y_t) - log pi_t(y_t)) detached (a one-sample "
    "per-token estimate, no sum over future tokens).",
    "OPD sampling: TRL generates one completion per dataset row; 16 prompts x 4 samples is 64 rows (each "
    "prompt repeated 4 times, shuffle_dataset=False, the prompt order shuffled once beforehand); ours samples "
    "G=4 per prompt of a shuffled batch of 16.",
    "OPD teacher: TRL runs the teacher inside the loss (every forward/backward micro-batch, after sampling); "
    "ours scores in the batch phase, before any forward with gradients.",
    "GRPO std: TRL scale_rewards='group' divides by the Bessel-corrected group std (n-1, trl.trainer.utils."
    "nanstd) + 1e-4; ours divides by the population std (n, torch.std(unbiased=False)) + 1e-6 "
    "(objectives.grpo_advantages). With G=4 TRL's advantages are sqrt(3/4)=0.87x ours.",
    "GRPO loss: TRL loss_type='dapo' (default) sums clipped ratio x advantage over tokens / the global count "
    "of completion tokens; ours sums rho x A over tokens / the kept-token count: the same per-token "
    "normalisation. TRL clips the ratio PPO-style (epsilon=0.2, min form); ours does not clip (rho_clip None). "
    "Both are exactly on-policy here (num_iterations=1, one optimizer step per generation): ratio = 1.",
    "KL to a reference: TRL GRPO beta=0.0 (default, no reference model loaded); ours has none. "
    "DistillationTrainer's beta is the JSD interpolation, not a reference penalty.",
    "Schedule/optimizer: the same AdamW and LambdaLR object kind on both sides (TRL is given optimizers=(...)); "
    "TRL's defaults (lr 1e-6, linear decay, warmup 0, betas 0.9/0.999) are overridden. TRL's own max_grad_norm "
    "1.0 = our grad_clip 1.0.",
    "Precision/memory: both fp32; TRL's bf16=True and gradient_checkpointing=True defaults are switched off "
    "(we do not checkpoint activations).",
    "Padding: both left-pad prompts for generation. TRL trains on [left-padded prompt | right-padded completion] "
    "rows and keeps only the completion positions' logits (logits_to_keep); ours packs prompt+completion "
    "contiguously, right-padded, and takes the log-softmax at completion positions only (token_logprobs' "
    "positions_BT): both sides score what is trained, nothing of the prompt.",
    "Lengths: max_completion_length=40 = our max_new_tokens=40; TRL max_prompt_length does not exist in 1.16 "
    "(prompts are not truncated, like ours); mask_truncated_completions=False (default): truncated rows train "
    "on both sides.",
    "Positions: TRL's training forward passes no position_ids, so a left-padded row's positions count its pads "
    "(arange), while generation counted from the first real token (attention-mask cumsum); ours trains on "
    "right-padded rows, positions from BOS in both. Under RoPE (Qwen3) a constant per-row shift leaves the "
    "attention scores unchanged up to rounding, so this changes cost nothing and numbers only at rounding level.",
    "Export: ours writes a bf16 HF folder and the full trainer state (fp32 weights, AdamW moments, schedule, "
    "DCP) at the last step; TRL's save_model writes the fp32 model + tokenizer only (save_strategy='no').",
    "Data: both draw from the same 320 MathTask examples, but each side's own shuffle picks the prompts.",
    "Logging: TRL logs every step (logging_steps=1, report_to none, tqdm off); ours logs every step at 20 steps.",
    "Process: ours runs through opdgeom.__main__.run, as `python -m opdgeom` does (the collector's third threshold "
    "at 100, everything frozen before exit); TRL's child starts and exits as a plain script, Python's defaults.",
]

# -- the parent -----------------------------------------------------------------------------------


def prepare(work: Path, args, model: dict, teacher: dict) -> dict:
    import torch

    from opdgeom.models import build_model, save_model
    from opdgeom.tasks import MathTask, split, write_jsonl
    from opdgeom.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    save_model(build_model(model, tok, seed=0), tok, work / "student", dtype=torch.float32)
    save_model(build_model(teacher, tok, seed=1), tok, work / "teacher", dtype=torch.float32)
    train, _ = split(MathTask(), max(320, args.prompts * args.steps), 8, seed=0)
    write_jsonl(work / "train.jsonl", train)
    return {"student": str(work / "student"), "teacher": str(work / "teacher"), "data": str(work / "train.jsonl")}


def run_child(side: str, method: str, paths: dict, args, work: Path, tag: str) -> dict:
    out = work / tag
    out.mkdir(parents=True)
    train = {"steps": args.steps, "prompts": args.prompts, "samples": args.samples}
    train |= {"new_tokens": args.new_tokens, "lr": args.lr}
    cfg = {**paths, "method": method, "threads": args.threads, "train": train, "gpu": args.gpu}
    (out / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env |= {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["OPDGEOM_DEVICE"] = "cuda" if args.gpu else "cpu"  # ours would take a GPU it finds; TRL's side follows
    env |= {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(CHILDREN), side, str(out / "config.json"), str(out)]
    log_path = out / "stderr.log"
    with open(log_path, "w") as err:
        launch = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT, cwd=out)
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {method} child failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
    timings = json.loads((out / "timings.json").read_text())
    marks, phases = timings["marks"], timings["phases"]
    loop = marks["last_update"] - marks["first_step"]
    row = {"end_to_end": end - launch, "startup": marks["first_step"] - launch, "loop": loop}
    row |= phases
    row["other"] = loop - sum(phases[k] for k in ("sampling", "teacher", "forward", "backward", "optimizer"))
    row["tokens_per_s"] = timings["tokens"] / loop
    row["peak_rss_mb"] = usage.ru_maxrss / 1024
    text = log_path.read_text()
    if side == "ours":
        step_s = logged_step_times(text)
    else:
        step_s = timings.get("trl_step_time", [])
    if step_s:
        row["log_step_s"] = sum(step_s)
        row["steady_step_s"] = statistics.median(step_s[1:] or step_s)
    return row


def logged_step_times(log: str) -> list[float]:
    """step_s of every ``step N/M ... step_s=..`` line of our training log."""
    return [
        float(field.split("=", 1)[1])
        for line in log.splitlines()
        if line.startswith("step ")
        for field in line.split()
        if field.startswith("step_s=")
    ]


METRICS = [
    ("end_to_end", "end-to-end wall (s)"),
    ("startup", "start-up: launch to first step (s)"),
    ("loop", "loop: first step to last update (s)"),
    ("log_step_s", "sum of logged step times (s)"),
    ("steady_step_s", "median logged step time, steps 2.. (s)"),
    ("sampling", "sampling (s)"),
    ("teacher", "teacher scoring (s)"),
    ("forward", "forward (s)"),
    ("backward", "backward (s)"),
    ("optimizer", "optimizer + clip (s)"),
    ("other", "other in loop (s)"),
    ("export", "export/save (s)"),
    ("tokens_per_s", "generated tokens/s (loop)"),
    ("peak_rss_mb", "peak RSS (MiB)"),
]
RATIOS = ["end_to_end", "loop", "startup", "sampling"]


def _mmm(values: list[float], digits: int = 2) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(method: str, ours: list[dict], theirs: list[dict]) -> str:
    trl_name = "DistillationTrainer" if method == "opd" else "GRPOTrainer"
    lines = [f"**{method.upper()}**: ours vs TRL {trl_name}, median [min, max] over {len(ours)} rounds", ""]
    lines += ["| metric | ours | TRL | ours/TRL |", "|---|---|---|---|"]
    for key, label in METRICS:
        a = [r[key] for r in ours if key in r]
        b = [r[key] for r in theirs if key in r]
        ratios = [_ratio(x[key], y[key]) for x, y in zip(ours, theirs) if key in x and key in y and y[key]]
        digits = 0 if key in ("tokens_per_s", "peak_rss_mb") else 2
        lines.append(f"| {label} | {_mmm(a, digits)} | {_mmm(b, digits)} | {_mmm(ratios)} |")
    return "\n".join(lines)


def ratio_summary(results: dict) -> str:
    lines = ["| pair | " + " | ".join(f"{k} ours/TRL min / median / max" for k in RATIOS) + " |"]
    lines.append("|---|" + "---|" * len(RATIOS))
    for method, sides in results.items():
        cells = []
        for key in RATIOS:
            r = [_ratio(x[key], y[key]) for x, y in zip(sides["ours"], sides["trl"]) if y[key]]
            cells.append(f"{min(r):.2f} / {statistics.median(r):.2f} / {max(r):.2f}" if r else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} logical cores visible, load average {load}"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="opd,rlvr")
    p.add_argument("--max-wall-s", type=float, help="start no round that would end past this many seconds")
    p.add_argument("--work", type=Path, help="keep the models and runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write every round's numbers here")
    p.add_argument("--gpu", action="store_true", help="the same pairs on a CUDA device at --gpu-model shapes")
    p.add_argument("--gpu-student", default=json.dumps(GPU_STUDENT), help="the GPU student's shapes (JSON)")
    p.add_argument("--gpu-teacher", default=json.dumps(GPU_TEACHER), help="the GPU teacher's shapes (JSON)")
    args = p.parse_args(argv)
    model = teacher = TINY_STUDENT
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench_vs_trl --gpu: no CUDA device here; nothing measured")
            return 2
        model, teacher = json.loads(args.gpu_student), json.loads(args.gpu_teacher)
    methods = args.methods.split(",")
    command = "python benchmarks/bench_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = prepare(work, args, model, teacher)
        results = {m: {"ours": [], "trl": []} for m in methods}
        started, done = time.perf_counter(), 0
        for r in range(args.rounds):
            t_round = time.perf_counter()
            for method in methods:
                for side in ("ours", "trl"):
                    row = run_child(side, method, paths, args, work, f"r{r}-{method}-{side}")
                    results[method][side].append(row)
                    print(
                        f"round {r + 1}/{args.rounds} {method} {side}: end_to_end={row['end_to_end']:.2f}s "
                        f"startup={row['startup']:.2f}s loop={row['loop']:.2f}s",
                        file=sys.stderr,
                        flush=True,
                    )
            done += 1
            spent, last = time.perf_counter() - started, time.perf_counter() - t_round
            if args.max_wall_s and done < args.rounds and spent + last > args.max_wall_s:
                print(f"stopping after {done} rounds: another would pass --max-wall-s", file=sys.stderr)
                break
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    shape = ", ".join(f"{k}={v}" for k, v in model.items() if k != "source")
    if teacher is not model:
        shape += "; teacher " + ", ".join(f"{k}={v}" for k, v in teacher.items() if k != "source")
    print(f"## bench_vs_trl: this project vs TRL ({versions()})\n")
    print(f"- machine: {machine()}")
    print(f"- device: {'cuda' if args.gpu else 'cpu'}; commit {commit}; command `{command}`")
    print(
        f"- work: student/teacher {shape}; {args.prompts} prompts x {args.samples} samples per step, "
        f"{args.new_tokens} new tokens, {args.steps} steps, fp32, one process, "
        f"{args.threads} threads, AdamW lr {args.lr:g} betas (0.9, 0.95), no warmup, cosine to 10%, clip 1.0"
    )
    rounds = len(results[methods[0]]["ours"])
    print(f"- rounds: {rounds}, alternating ours/TRL, each side a fresh process\n")
    print(ratio_summary(results) + "\n")
    for method in methods:
        print(table(method, results[method]["ours"], results[method]["trl"]) + "\n")
    print("Differences in what the two compute:\n")
    for d in DIFFERENCES:
        print(f"- {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
