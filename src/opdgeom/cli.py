"""The entry points the workflow's rules call: ``opdgeom <step> ...`` with explicit paths.

Science settings travel as JSON (``--spec``), paths as flags; every output is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from opdgeom.io import write_parquet


def _data(args) -> None:
    from opdgeom.tasks import DatasetTask, get_task, split, write_jsonl

    task = get_task(args.domain)
    if args.sources:
        from opdgeom.tasks.roles import DomainSources, real_splits

        roles = DomainSources.from_roles(_sources_json(args.sources, "--sources"), f"domain {args.domain}")
        tokenizer = None
        if args.tokenizer:
            from opdgeom.models import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        benchmarks = _sources_json(args.benchmarks, "--benchmarks") if args.benchmarks else {}
        splits = real_splits(
            args.domain, roles, args.n_train, args.n_eval, args.seed, args.family, tokenizer, benchmarks
        )
        sft, train, held_out = splits.sft, splits.train, splits.eval
        print("\n".join(splits.report), file=sys.stderr)
    elif isinstance(task, DatasetTask):
        train, held_out = task.load_splits(args.n_train, args.n_eval, args.seed)
        sft = train
    else:
        train, held_out = split(task, args.n_train, args.n_eval, args.seed)
        sft = train  # a synthetic example is both a demonstration and a prompt with its answer
    write_jsonl(args.sft_out, sft)
    write_jsonl(args.train_out, train)
    write_jsonl(args.eval_out, held_out)
    print(f"{args.domain}: {len(sft)} sft, {len(train)} train, {len(held_out)} eval examples", file=sys.stderr)


def _sources_json(text: str, flag: str) -> dict:
    from opdgeom.tasks.sources import Source

    return {name: Source.from_dict(s, f"{flag}.{name}") for name, s in json.loads(text).items()}


def _benchmark_data(args) -> None:
    from opdgeom.tasks import write_jsonl
    from opdgeom.tasks.sources import Source, load_source

    source = Source.from_dict(json.loads(args.source), "--source")
    loaded = load_source(source, family=args.family)
    if not loaded.examples:
        raise ValueError(f"{loaded.summary()}: no problems left")
    write_jsonl(args.out, loaded.examples)
    print(loaded.summary(), file=sys.stderr)


def _corpus(args) -> None:
    from opdgeom.tasks import Example, generic_corpus, write_jsonl

    docs = generic_corpus(args.n_docs, args.seed)
    write_jsonl(args.out, [Example(prompt="", completion=d[: args.seq_len], answer="") for d in docs])


def _tokenizer(args) -> None:
    from opdgeom.tokenizer import build_char_tokenizer, save_tokenizer

    save_tokenizer(build_char_tokenizer(), args.out)


def _model(args) -> None:
    spec = json.loads(args.spec)
    if spec["source"] == "hub":
        from opdgeom.hub import download_model

        download_model(spec["repo"], spec["revision"], args.out)
        return
    from opdgeom.train.run import build_and_pretrain

    build_and_pretrain(spec, json.loads(args.pretrain), args.tokenizer, args.corpus, args.out, args.seed)


def _fetch_models(args) -> None:
    from opdgeom.config import load_family
    from opdgeom.hub import cache_dir, resolve

    family = load_family(args.family, args.families_dir, args.schema)
    hub_models = {name: m for name, m in family["models"].items() if m["source"] == "hub"}
    if not hub_models:
        raise ValueError(f"family {args.family!r} builds all its models; nothing to fetch")
    print(f"filling the Hugging Face cache {cache_dir()} for family {args.family}", file=sys.stderr)
    for name, spec in hub_models.items():
        snapshot = resolve(spec["repo"], spec["revision"])
        print(f"{name}: {spec['repo']}@{spec['revision']} = {snapshot.commit} in {snapshot.path}", file=sys.stderr)


def _train(args) -> None:
    from opdgeom.spec import RunSpec
    from opdgeom.tracking import TrackerSettings
    from opdgeom.train.run import train_run

    monitor = None
    if args.monitor_every:
        from opdgeom.geometry.live import MonitorSettings

        monitor = MonitorSettings(args.monitor_every, args.monitor_k)

    train_run(
        RunSpec.from_json(json.loads(args.spec), where="--spec"),
        args.init,
        args.train_data,
        args.out,
        args.seed,
        teacher=args.teacher,
        projection_basis=args.projection_basis,
        tracker=TrackerSettings(args.tracker, args.tracker_project, args.wandb_mode),
        monitor=monitor,
    )


def _basis(args) -> None:
    from opdgeom.geometry.basis import write_bases

    write_bases(args.init, args.checkpoint, args.rank, args.out)


def _checkpoints(args) -> list[dict]:
    from opdgeom.manifest import read_manifest

    if args.manifest:
        return read_manifest(args.manifest)
    return [{"step": 0, "path": args.model, "tokens": 0}]


def _evaluate(args) -> None:
    from opdgeom.evaluate import EvalSettings, evaluate_checkpoints
    from opdgeom.tracking import TrackerSettings, open_tracker

    settings = EvalSettings(
        args.max_new_tokens, args.batch_size, args.temperature, args.prompt_format == "chat", args.engine,
        args.samples, args.score_tokens, args.kv_cache_gb and int(args.kv_cache_gb * 2**30),
        k=args.k, accuracy_temperature=args.accuracy_temperature, top_p=args.top_p,
    )  # fmt: skip
    tracking = TrackerSettings(args.tracker, args.tracker_project, args.wandb_mode)
    if tracking.kind != "none" and args.tracker_dir is None:
        raise SystemExit("opdgeom evaluate: --tracker needs --tracker-dir (the run's folder)")
    config = {"ref": args.ref, "eval_data": str(args.eval_data), **dataclasses.asdict(settings)}
    with open_tracker(tracking, args.ref, args.tracker_dir or args.out.parent, config) as tracker:
        table = evaluate_checkpoints(
            args.ref, _checkpoints(args), args.eval_data, args.domain, settings, teacher=args.teacher,
            teacher_chat=args.teacher_prompt_format == "chat", cache=args.cache, tracker=tracker,
        )  # fmt: skip
    write_parquet(table, args.out)


def _label(table, args):
    """Tag a comparison with the run (and step) it describes, for tables that stack many runs."""
    import polars as pl

    if args.run is not None:
        table = table.with_columns(run=pl.lit(args.run), step=pl.lit(args.step, dtype=pl.Int64))
    return table


def _compare(args) -> None:
    from opdgeom.geometry.compare import compare_checkpoints, sparsity_table

    if args.sparsity_only:
        table = sparsity_table(args.base, args.tuned, eta=args.eta)
    else:
        table = compare_checkpoints(
            args.base, args.tuned, k=args.k, alpha=args.alpha, eta=args.eta, cache=args.cache, device=args.device
        )
    _print_summary(table)
    if args.out:
        write_parquet(_label(table, args), args.out)


def _print_summary(table) -> None:
    """Per module type: parameter-weighted mean of every metric over the layer matrices of that type
    (embeddings, lm_head and 1-D tensors are in the table, not in this summary)."""
    import polars as pl

    from opdgeom.figures.tables import weighted_mean

    per_tensor = table.filter(~pl.col("tensor").str.contains(":"), pl.col("kind") == "matrix")
    summary = (
        per_tensor.group_by("module", "metric")
        .agg(value=weighted_mean())
        .sort("module")
        .pivot(on="module", index="metric", values="value")
        .sort("metric")
    )
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200, float_precision=5):
        print(summary, file=sys.stderr)


def _trajectory(args) -> None:
    import polars as pl

    from opdgeom.geometry.trajectory import trajectory_table
    from opdgeom.manifest import MANIFEST, read_manifest, run_name

    manifest = args.run_dir / MANIFEST
    checkpoints = read_manifest(manifest)
    run = run_name(manifest)
    table = trajectory_table(
        {c["step"]: c["path"] for c in checkpoints}, K=args.k, cache=args.cache, device=args.device
    )
    write_parquet(table.with_columns(run=pl.lit(run)), args.out)


def _diagnose(args) -> None:
    from opdgeom.diagnose import Settings, diagnose

    settings = Settings(
        k=args.k, alpha=args.alpha, eta=args.eta, trajectory_k=args.trajectory_k, device=args.device,
        cache=args.cache, use_cache=not args.no_cache, allow_download=args.allow_download,
        progress=not args.no_progress,
    )  # fmt: skip
    diagnose(args.base, args.runs, args.out, settings)


def _watch(args) -> None:
    from opdgeom.diagnose import Settings
    from opdgeom.diagnose.follow import follow
    from opdgeom.tracking import TrackerSettings, open_tracker

    settings = Settings(
        k=args.k, trajectory_k=args.trajectory_k, device=args.device, cache=args.cache,
        use_cache=not args.no_cache, allow_download=args.allow_download, progress=not args.no_progress,
    )  # fmt: skip
    tracking = TrackerSettings(args.tracker, args.tracker_project, args.wandb_mode)
    config = {"base": args.base, "run_dir": str(args.run_dir), "k": args.k, "trajectory_k": args.trajectory_k}
    with open_tracker(tracking, f"watch-{args.run_dir.resolve().name}", args.out, config) as tracker:
        follow(
            args.base, args.run_dir, args.out, settings, poll_s=args.poll, max_idle_s=args.max_idle,
            once=args.once, tracker=None if args.tracker == "none" else tracker,
        )  # fmt: skip


def _cache(args) -> None:
    from opdgeom.geometry import cache

    if args.action == "info":
        print(json.dumps(cache.info(args.root), indent=2, default=str))
    else:
        removed = cache.gc(args.root, max_age_days=args.max_age_days, max_bytes=args.max_bytes)
        print(f"removed {removed} entries", file=sys.stderr)


def _figure(args) -> None:
    from opdgeom.figures import FIGURES

    FIGURES[args.name](inputs=args.inputs, out_prefix=Path(args.out_prefix), **json.loads(args.options))


def _memory_plan(args) -> None:
    if args.evaluate:
        from opdgeom.train.eval_plan import main as eval_plan

        print(eval_plan(args.family, args.gpu_mem_gb, as_json=args.json))
        return
    if args.gpus is None:
        raise SystemExit("opdgeom memory-plan: --gpus is required for a training job's plan")
    from opdgeom.train.memory_plan import main as memory_plan

    print(memory_plan(args.family, args.gpus, args.gpu_mem_gb, as_json=args.json))


def _statistics_arguments(p) -> None:
    """How diagnose and watch compute: the statistics cache, the device, hub access, progress."""
    p.add_argument("--cache", type=Path, help="statistics cache (default $OPDGEOM_CACHE or ~/.cache/opdgeom)")
    p.add_argument("--no-cache", action="store_true", help="compute every statistic afresh, store nothing")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--allow-download", action="store_true", help="download a hub BASE missing from the HF cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _tracker_arguments(p) -> None:
    p.add_argument("--tracker", choices=["none", "tensorboard", "wandb", "trackio"], default="none")
    p.add_argument("--tracker-project", default="opdgeom", help="the tracker's project (W&B, trackio)")
    p.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdgeom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="write train/eval splits of a domain (synthetic, or a real data set offline)")
    p.add_argument("--domain", required=True)
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-eval", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-out", type=Path, required=True, help="demonstrations (what SFT runs train on)")
    p.add_argument("--train-out", type=Path, required=True, help="prompts with answers (policy-gradient runs)")
    p.add_argument("--eval-out", type=Path, required=True)
    p.add_argument("--sources", help='a real domain\'s pinned sources by role as JSON: {"sft": {...}, ...}')
    p.add_argument("--benchmarks", help="benchmark sources as JSON {name: source}: training data is decontaminated")
    p.add_argument("--tokenizer", type=Path, help="the student's tokenizer: measures the sources' max_tokens")
    p.add_argument("--family", help="named in the fetch-data command of a missing source's error")
    p.set_defaults(func=_data)

    p = sub.add_parser("benchmark-data", help="write a benchmark's problems from a pinned source (offline)")
    p.add_argument("--source", required=True, help="the source as JSON (a family preset's sources entry)")
    p.add_argument("--family", help="named in the fetch-data command of a missing source's error")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_benchmark_data)

    p = sub.add_parser("corpus", help="write the generic pretraining corpus")
    p.add_argument("--n-docs", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_corpus)

    p = sub.add_parser("tokenizer", help="write the character-level tokenizer (HF format)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("model", help="build+pretrain a tiny model, or download a pinned hub revision")
    p.add_argument("--spec", required=True, help="the family's model entry as JSON")
    p.add_argument("--pretrain", default="{}", help="pretraining settings as JSON (tiny models)")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_model)

    from opdgeom.tasks.fetch import add_fetch_parser

    add_fetch_parser(sub)  # fetch-data: a family's pinned data sources, on a login node

    p = sub.add_parser("fetch-models", help="pre-fill the Hugging Face cache with a family's hub models")
    p.add_argument("--family", required=True)
    p.add_argument("--families-dir", type=Path, default=Path("config/families"))
    p.add_argument("--schema", type=Path, default=Path("workflow/schemas/family.schema.yaml"))
    p.set_defaults(func=_fetch_models)

    p = sub.add_parser("train", help="train one run; checkpoints + manifest.json in --out")
    p.add_argument("--spec", required=True, help="the planned run as JSON")
    p.add_argument("--init", type=Path, required=True)
    p.add_argument("--train-data", type=Path, required=True)
    p.add_argument("--teacher", type=Path)
    p.add_argument("--projection-basis", type=Path, help="the training subspace (written by `opdgeom basis`)")
    p.add_argument("--seed", type=int, default=0)
    _tracker_arguments(p)
    p.add_argument("--monitor-every", type=int, help="live channel geometry every N steps (monitor.parquet)")
    p.add_argument("--monitor-k", type=int, default=16, help="the monitor's subspace dimension K")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_train)

    p = sub.add_parser("basis", help="top-k right singular vectors of each matrix's update (projected training)")
    p.add_argument("init", type=Path, help="the reference run's init")
    p.add_argument("checkpoint", type=Path, help="the reference run's checkpoint")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="a safetensors file of n x k bases")
    p.set_defaults(func=_basis)

    p = sub.add_parser("evaluate", help="held-out accuracy of every checkpoint of a run (or one model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path)
    src.add_argument("--model", type=Path)
    p.add_argument("--ref", required=True)
    p.add_argument("--eval-data", type=Path, required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", type=Path, help="also the per-token reverse KL to this model on sampled completions")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the reverse-KL metric")
    p.add_argument("--samples", type=int, default=1, help="sampled completions per prompt (reverse KL, reward)")
    p.add_argument("--prompt-format", choices=["raw", "chat"], default="raw", help="how the evaluated model reads")
    p.add_argument("--teacher-prompt-format", choices=["raw", "chat"], default="raw", help="how the teacher reads")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="who decodes (greedy and sampled)")
    p.add_argument("--score-tokens", type=int, help="padded tokens per teacher-forced pass (default: batch-size rows)")
    p.add_argument("--kv-cache-gb", type=float, help="the vLLM engine's KV cache (default: batch-size sequences)")
    p.add_argument("--k", type=int, default=1, help="accuracy as avg@k: k samples per problem (default 1: greedy)")
    p.add_argument("--accuracy-temperature", type=float, default=0.0, help="avg@k's sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="avg@k's nucleus (top-p) sampling")
    _tracker_arguments(p)
    p.add_argument("--tracker-dir", type=Path, help="where the tracker writes (the run's folder)")
    p.add_argument("--cache", type=Path, help="reuse results of checkpoints evaluated before (folder; default: none)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("compare", help="diagnose two HF checkpoints of the same architecture")
    p.add_argument("base", type=Path)
    p.add_argument("tuned", type=Path)
    p.add_argument("--out", type=Path, help="long-format parquet (tensor, layer, module, metric, value)")
    p.add_argument("--k", type=int, default=16, help="subspace rank for principal angles and masks")
    p.add_argument("--alpha", type=float, default=0.05, help="mask fraction (random overlap baseline)")
    p.add_argument("--eta", type=float, default=1e-3, help="bf16-aware sparsity tolerance")
    p.add_argument("--cache", type=Path, help="statistics cache (default $OPDGEOM_CACHE)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sparsity-only", action="store_true", help="only bf16-aware sparsity (no spectra)")
    p.add_argument("--run", help="label rows with this run name (workflow tables)")
    p.add_argument("--step", type=int, default=None, help="label rows with this step")
    p.set_defaults(func=_compare)

    p = sub.add_parser("trajectory", help="cumulative-update metrics of every checkpoint of a run")
    p.add_argument("run_dir", type=Path, help="a run folder with manifest.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=16, help="K of the subspace similarity")
    p.add_argument("--cache", type=Path)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_trajectory)

    p = sub.add_parser(
        "diagnose", help="tables, figures and one HTML page for checkpoints trained anywhere (TRL, verl, PEFT, ...)"
    )
    p.add_argument("base", help="the base model: an HF folder or a hub id org/name[@revision] in the local HF cache")
    p.add_argument(
        "runs", nargs="+", metavar="RUN",
        help="[NAME=]FOLDER (opdgeom run, TRL checkpoint-N/, verl global_step_N/, PEFT adapters, one HF folder) "
        "or [NAME=]FOLDER,FOLDER,... (HF folders in step order)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically): index.html, ...")
    p.add_argument("--k", type=int, default=16, help="subspace rank for principal angles and masks")
    p.add_argument("--alpha", type=float, default=0.05, help="mask fraction (random overlap baseline)")
    p.add_argument("--eta", type=float, default=1e-3, help="bf16-aware sparsity tolerance")
    p.add_argument("--trajectory-k", type=int, default=16, help="K of the trajectory's subspace similarity")
    _statistics_arguments(p)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("watch", help="follow a run folder while it is written: diagnose page updated per checkpoint")
    p.add_argument("base", help="the base model: an HF folder or a hub id org/name[@revision] in the local HF cache")
    p.add_argument("run_dir", type=Path, help="the run folder (TRL checkpoint-N/, verl global_step_N/, opdgeom)")
    p.add_argument("--out", type=Path, required=True, help="output folder: index.html, tables/, figures/, tracker")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between scans of RUN_DIR")
    p.add_argument("--max-idle", type=float, help="stop after this many seconds without a new checkpoint")
    p.add_argument("--once", action="store_true", help="one pass over what is complete now, then exit")
    p.add_argument("--k", type=int, default=16, help="subspace rank for principal angles and masks")
    p.add_argument("--trajectory-k", type=int, default=16, help="K of the trajectory's subspace similarity")
    _statistics_arguments(p)
    _tracker_arguments(p)
    p.set_defaults(func=_watch)

    p = sub.add_parser("cache", help="inspect or garbage-collect the statistics cache")
    p.add_argument("action", choices=["info", "gc"])
    p.add_argument("--root", type=Path, help="cache folder (default $OPDGEOM_CACHE)")
    p.add_argument("--max-age-days", type=float)
    p.add_argument("--max-bytes", type=int)
    p.set_defaults(func=_cache)

    p = sub.add_parser("figure", help="draw one figure or table from long-format tables")
    p.add_argument("name")
    p.add_argument("--inputs", nargs="+", type=Path, required=True)
    p.add_argument("--out-prefix", required=True, help="outputs are <prefix>.png/.pdf/.csv/...")
    p.add_argument("--options", default="{}", help="figure options as JSON")
    p.set_defaults(func=_figure)

    p = sub.add_parser("memory-plan", help="per-rank GPU memory of a family's training (or evaluate) job, by component")
    p.add_argument("--family", required=True, help="a preset in config/families")
    p.add_argument("--gpus", type=int, help="ranks (GPUs) of one training job")
    p.add_argument("--evaluate", action="store_true", help="an evaluate job's plan instead (GPUs: evaluate.gpus)")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GB (1e9 bytes)")
    p.add_argument("--json", action="store_true", help="the plan as JSON (peak_bytes, components, phases)")
    p.set_defaults(func=_memory_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"opdgeom {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
