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

How each phase is measured. Both children run in this script (``--child``) so that timers can be wrapped
around the phases; the code that runs is the user's (``opdgeom.cli.main(["train", ...])``, or a TRL
trainer's ``train()``), the wrappers add a perf_counter pair per call.

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
    "contiguously, right-padded, and scores the whole row (a log-softmax over every position).",
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
]

PHASES = ["startup", "sampling", "teacher", "forward", "backward", "optimizer", "other", "export"]


# -- the children ---------------------------------------------------------------------------------


class Clock:
    """Wall-time sums per phase plus named marks (time.time(), comparable with the parent's)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.marks: dict[str, float] = {}
        self.tokens = 0

    def add(self, key: str, seconds: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def mark(self, key: str, first: bool = False) -> None:
        if not (first and key in self.marks):
            self.marks[key] = time.time()

    def wrap(self, owner, name: str, key: str, before=None, after=None):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if before is not None:
                before(args)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self.add(key, time.perf_counter() - t0)
            if after is not None:
                after(out)
            return out

        setattr(owner, name, timed)


def _child_ours(cfg: dict, out: Path) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    from opdgeom import cli
    from opdgeom.rollout import hf
    from opdgeom.train import loop, methods
    from opdgeom.train import teacher as teacher_mod

    clock = Clock()
    clock.wrap(hf.HFEngine, "sample", "sampling", after=lambda r: _count(clock, r.completion_ids))
    clock.wrap(teacher_mod.TeacherScorer, "__call__", "teacher")
    clock.wrap(methods.PolicyGradientMethod, "batch", "batch", before=lambda a: clock.mark("first_step", True))
    clock.wrap(methods.PolicyGradientMethod, "loss", "forward")
    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer_step", after=lambda _: clock.mark("last_update"))
    clock.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    clock.wrap(loop, "export_hf", "export_hf")
    clock.wrap(loop, "save_trainer_state", "save_state")
    train = cfg["train"]
    spec = {"name": f"bench-{cfg['method']}", "method": cfg["method"], "init": "student", "domain": "math"}
    spec["train"] = {
        "steps": train["steps"], "batch_size": train["prompts"], "lr": train["lr"], "weight_decay": 0.0,
        "warmup_steps": 0, "grad_clip": 1.0, "checkpoint_every": train["steps"],
        "max_new_tokens": train["new_tokens"], "temperature": 1.0, "group_size": train["samples"],
    }  # fmt: skip
    argv = ["train", "--spec", json.dumps(spec), "--init", cfg["student"], "--train-data", cfg["data"]]
    argv += ["--out", str(out / "run"), "--seed", "0"]
    if cfg["method"] == "opd":
        argv += ["--teacher", cfg["teacher"]]
    if cli.main(argv) != 0:
        raise SystemExit("opdgeom train failed")
    clock.mark("trained")
    s = clock.sums
    return {
        "marks": clock.marks,
        "tokens": clock.tokens,
        "phases": {
            "sampling": s.get("sampling", 0.0),
            "teacher": s.get("teacher", 0.0),
            "forward": s.get("forward", 0.0),
            "backward": s.get("backward", 0.0),
            "optimizer": s.get("optimizer_step", 0.0) + s.get("clip", 0.0),
            "export": s.get("export_hf", 0.0) + s.get("save_state", 0.0),
        },
    }


def _count(clock: Clock, completion_ids) -> None:
    clock.tokens += sum(len(c) for c in completion_ids)


def _child_trl(cfg: dict, out: Path) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import datasets
    import transformers
    import trl
    from tokenizers import processors

    from opdgeom.tasks import MathTask
    from opdgeom.tasks.files import read_jsonl
    from opdgeom.train.loop import lr_lambda

    clock = Clock()
    train, method = cfg["train"], cfg["method"]
    device = "cuda" if cfg.get("gpu") else "cpu"
    tok = transformers.AutoTokenizer.from_pretrained(cfg["student"])
    # Our prompts are BOS + characters; the char tokenizer adds nothing itself, so TRL's gets a BOS template.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    if tok("1+2")["input_ids"][0] != tok.bos_token_id:
        raise SystemExit("the TRL tokenizer does not start prompts with BOS")
    student = transformers.AutoModelForCausalLM.from_pretrained(cfg["student"], dtype=torch.float32).to(device)
    examples = read_jsonl(cfg["data"])
    import random

    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    clock.wrap(torch.optim.AdamW, "step", "optimizer_step")  # before the scheduler wraps it in turn
    optimizer = torch.optim.AdamW(student.parameters(), lr=train["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, train["steps"]))
    rows = train["prompts"] * train["samples"]
    common = dict(
        output_dir=str(out / "trl"), max_steps=train["steps"], per_device_train_batch_size=rows,
        gradient_accumulation_steps=1, learning_rate=train["lr"], max_grad_norm=1.0, bf16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        max_completion_length=train["new_tokens"], temperature=1.0, top_k=0, top_p=1.0, seed=0,
        use_cpu=not cfg.get("gpu"), dataloader_num_workers=0,
    )  # fmt: skip
    if method == "opd":
        teacher = transformers.AutoModelForCausalLM.from_pretrained(cfg["teacher"], dtype=torch.float32).to(device)
        picked = [examples[i] for i in order]
        data = datasets.Dataset.from_dict(
            {"prompt": [e.prompt for e in picked for _ in range(train["samples"])]}
        )  # each prompt G times, consecutively: 16 prompts x 4 samples per step of 64 rows
        args = trl.DistillationConfig(**common, shuffle_dataset=False, beta=1.0)
        trainer_cls, extra = trl.DistillationTrainer, {"teacher_model": teacher}
    else:
        task = MathTask()

        def reward(prompts, completions, answer, **_):
            return [float(task.verify(c, a)) for c, a in zip(completions, answer)]

        data = datasets.Dataset.from_dict(
            {"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples]}
        )
        args = trl.GRPOConfig(**common, num_generations=train["samples"], beta=0.0, loss_type="dapo")
        trainer_cls, extra = trl.GRPOTrainer, {"reward_funcs": reward}

    class Marks(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.mark("first_step", True)

        def on_step_end(self, args, state, control, **kw):
            clock.mark("last_update")

    trainer = trainer_cls(
        model=student, args=args, train_dataset=data, processing_class=tok,
        optimizers=(optimizer, scheduler), callbacks=[Marks()], **extra,
    )  # fmt: skip
    teacher_model = getattr(trainer, "teacher_model", None)

    def generated(result):
        _count(clock, result[1])

    clock.wrap(trainer, "_generate", "sampling", after=generated)
    original_hidden = trainer._get_last_hidden_state if hasattr(trainer, "_get_last_hidden_state") else None
    if original_hidden is not None and teacher_model is not None:

        def hidden(model, *a, **kw):
            t0 = time.perf_counter()
            result = original_hidden(model, *a, **kw)
            if model is not student and model is not getattr(trainer, "model", None):
                clock.add("teacher", time.perf_counter() - t0)
            return result

        trainer._get_last_hidden_state = hidden
    clock.wrap(trainer, "compute_loss", "compute_loss")
    clock.wrap(trainer.accelerator, "backward", "backward")
    clock.wrap(trainer.accelerator, "clip_grad_norm_", "clip")
    trainer.train()
    clock.mark("trained")
    t0 = time.perf_counter()
    trainer.save_model(str(out / "trl" / "final"))
    clock.add("export", time.perf_counter() - t0)
    s = clock.sums
    logged = [h for h in trainer.state.log_history if "step_time" in h]
    return {
        "marks": clock.marks,
        "tokens": clock.tokens,
        "trl_step_time": [h["step_time"] for h in logged],
        "phases": {
            "sampling": s.get("sampling", 0.0),
            "teacher": s.get("teacher", 0.0),
            "forward": s.get("compute_loss", 0.0) - s.get("teacher", 0.0),
            "backward": s.get("backward", 0.0),
            "optimizer": s.get("optimizer_step", 0.0) + s.get("clip", 0.0),
            "export": s.get("export", 0.0),
        },
    }


def child_main(args) -> int:
    cfg = json.loads(Path(args.config).read_text())
    out = Path(args.out)
    result = (_child_ours if args.child == "ours" else _child_trl)(cfg, out)
    (out / "timings.json").write_text(json.dumps(result))
    return 0


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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--config", str(out / "config.json")]
    cmd += ["--out", str(out)]
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
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
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
