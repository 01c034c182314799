"""The two children of benchmarks/bench_vs_trl.py: one training job each, its phases timed.

``python benchmarks/vs_trl_children.py ours|trl CONFIG OUT`` runs this project's job (through
``opdgeom.__main__.run``, as ``python -m opdgeom train`` runs) or a TRL trainer's ``train()`` on the work
CONFIG names, with a perf_counter pair wrapped around every phase, and writes OUT/timings.json. What each
phase covers is written in bench_vs_trl.py's docstring.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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
    # First, as `python -m opdgeom` does: the entry point's collector settings precede torch's import.
    from opdgeom.__main__ import run  # noqa: I001

    import torch

    torch.set_num_threads(cfg["threads"])
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
    if run(argv) != 0:
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


def main(argv: list[str]) -> int:
    side, config, out = argv
    cfg = json.loads(Path(config).read_text())
    result = (_child_ours if side == "ours" else _child_trl)(cfg, Path(out))
    (Path(out) / "timings.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
