"""The findings page: what the tables measured, per figure and per run entry, with intervals.

Built from the evaluation, compare and trajectory tables only; it states numbers and whether each
method did its job by a fixed criterion, and nothing else (no expected outcome is written in).
Intervals are 95%: over seeds a Student-t interval (n seeds, none for one seed); held-out accuracy
and its change a percentile bootstrap over prompts (the same prompts resampled for every seed).

Jobs (first vs last checkpoint of a run; "yes" when the interval of the change lies on the stated
side of 0, "no" when it lies on the other side, "unresolved" otherwise). The interval that decides:
for accuracy the paired bootstrap over prompts of the seed-mean change; for the other quantities the
t interval over seeds, and for a run entry with one seed (no seed interval) the paired bootstrap over
prompts of its per-prompt parts, which is also shown beside the t interval:
- every method: held-out accuracy of the last checkpoint minus its init's (the anchor's);
- sft: held-out NLL of the demonstrations goes down;
- opd (and mix): per-token reverse KL to the teacher on self-sampled completions goes down;
- rlvr (and mix): the verifier's reward on self-sampled completions goes up.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import polars as pl

from opdgeom.figures.tables import groups_of, layer_matrices
from opdgeom.io import write_text
from opdgeom.stats import Interval, bootstrap_interval, bootstrap_statistic, seed_interval

JOBS = {
    "sft": [("nll", "held-out NLL", -1)],
    "opd": [("reverse_kl", "reverse KL to teacher", -1)],
    "rlvr": [("sampled_reward", "sampled reward", +1)],
    "mix": [("reverse_kl", "reverse KL to teacher", -1), ("sampled_reward", "sampled reward", +1)],
}
# figure -> (description, table, metric, summary over layer matrices, which checkpoint)
FIGURE_QUANTITIES = {
    "table1": ("bf16 update sparsity, all layer matrices (fraction unchanged)", "compare", "bf16_sparsity", "weighted"),
    "rotation": ("max principal angle of the top-k right subspace, degrees (median over matrices)", "compare",
                 "principal_angle_right_max", "median"),
    "drift": ("normalized spectral shift (median over matrices)", "compare", "spectral_shift", "median"),
    "localization": ("update-mask overlap with the principal mask (weighted mean; random = alpha)", "compare",
                     "mask_overlap_principal", "weighted"),
    "localization (low magnitude)": ("update-mask overlap with the low-magnitude mask (weighted mean; random = alpha)",
                                     "compare", "mask_overlap_low_magnitude", "weighted"),
    "fig4a": ("stable rank of the final cumulative update (median over matrices)", "trajectory", "stable_rank",
              "median"),
    "fig4b": ("size of the final cumulative update sqrt(sum ‖dW‖_F^2)", "trajectory", "frobenius_norm", "rss"),
    "fig4c": ("tail index of the final cumulative update (median over matrices)", "trajectory", "tail_index",
              "median"),
    "fig5": ("subspace similarity Sim_K(t, T) at the middle checkpoint (median over matrices)", "trajectory",
             "subspace_similarity_to_final", "median-mid"),
}  # fmt: skip


def _fmt(ci: Interval, digits: int = 3) -> str:
    if ci.n == 0 or math.isnan(ci.mean):
        return "n/a"
    return ci.format(digits)


def _verdict(ci: Interval, sign: int) -> str:
    if ci.n == 0 or math.isnan(ci.lo):
        if ci.n and not math.isnan(ci.mean):
            return "one seed, no interval: " + ("lower" if ci.mean < 0 else "higher" if ci.mean > 0 else "equal")
        return "n/a"
    right_side = ci.lo > 0 if sign > 0 else ci.hi < 0
    wrong_side = ci.hi < 0 if sign > 0 else ci.lo > 0
    if right_side:
        return "yes"
    if wrong_side:
        return "no"
    return "unresolved"


# metric -> the per-prompt columns of the eval table it is a statistic of, and that statistic
PER_PROMPT = {
    "nll": (("nll_sum_per_prompt", "nll_tokens_per_prompt"), lambda nll_SN, tok_SN: nll_SN.sum(-1) / tok_SN.sum(-1)),
    "reverse_kl": (("kl_sum_per_prompt", "kl_tokens_per_prompt"), lambda kl_SN, tok_SN: kl_SN.sum(-1) / tok_SN.sum(-1)),
    "sampled_reward": (("reward_per_prompt",), lambda reward_SN: reward_SN.mean(-1)),
}


def _prompt_change(first: list[pl.DataFrame], last: list[pl.DataFrame], metric: str) -> Interval | None:
    """Seed-mean change of ``metric`` from each run's first to last checkpoint, with a paired bootstrap
    over prompts (the same resampled prompts for every seed and both checkpoints); None without the
    per-prompt columns."""
    columns, statistic = PER_PROMPT[metric]
    if not all(c in row.columns and row[c][0] is not None for row in first + last for c in columns):
        return None  # tables written before the per-prompt parts existed

    def stack(rows):
        return [np.stack([np.asarray(row[c][0], dtype=np.float64) for row in rows]) for c in columns]

    k = len(columns)
    change = lambda *a: float((statistic(*a[k:]) - statistic(*a[:k])).mean())  # noqa: E731
    return bootstrap_statistic(change, stack(first) + stack(last))


# every held-out result of a checkpoint, down to each prompt's parts
RESULT_COLUMNS = ("accuracy", "nll", "reverse_kl", "sampled_reward", "correct", "nll_sum_per_prompt",
                  "nll_tokens_per_prompt", "reward_per_prompt", "kl_sum_per_prompt",
                  "kl_tokens_per_prompt")  # fmt: skip


def identical_runs(evals: pl.DataFrame) -> list[tuple[list[str], list[int], list[int]]]:
    """Groups of runs whose held-out results at their last checkpoint are equal, column by column and
    prompt by prompt, with the checkpoints after the init at which every member's results are equal
    and all those checkpoints. Two configurations that train to the same final bf16 weights land here
    (their job lines and their init-vs-final geometry are one measurement); a page that listed them as
    separate findings without saying so would count one measurement twice."""
    columns = [c for c in RESULT_COLUMNS if c in evals.columns]
    results: dict[str, dict[int, str]] = {}
    for ref in sorted(evals["ref"].unique().to_list()):
        rows = evals.filter((pl.col("ref") == ref) & (pl.col("step") > 0)).sort("step")
        results[ref] = {step: repr(row) for step, row in zip(rows["step"].to_list(), rows.select(columns).rows())}
    by_last: dict[tuple, list[str]] = {}
    for ref, per_step in results.items():
        if per_step:
            last = max(per_step)
            by_last.setdefault((last, per_step[last]), []).append(ref)
    groups = []
    for refs in (refs for refs in by_last.values() if len(refs) > 1):
        steps = sorted(set.intersection(*(set(results[ref]) for ref in refs)))
        same = [s for s in steps if len({results[ref][s] for ref in refs}) == 1]
        groups.append((refs, same, steps))
    return groups


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _scalar(rows: pl.DataFrame, summary: str) -> float:
    values = rows["value"].fill_nan(None).drop_nulls()
    if values.is_empty():
        return math.nan
    if summary == "weighted":
        w = rows.filter(pl.col("value").fill_nan(None).is_not_null())["parameters"].cast(pl.Float64)
        return float((values.cast(pl.Float64) * w).sum() / w.sum())
    if summary == "rss":
        return float(math.sqrt((values.cast(pl.Float64) ** 2).sum()))
    return float(values.median())


def findings(
    inputs: list[Path],
    out_prefix: Path,
    methods: dict[str, str],
    references: dict[str, str],
    inits: dict[str, str],
    train: dict[str, dict],
    k: int = 16,
    alpha: float = 0.05,
    cluster: dict | None = None,
    title: str = "Findings",
) -> str:
    """Write <prefix>.md and <prefix>.html; return the markdown. Inputs: eval, compare and trajectory
    tables (paths under eval/, diagnose/compare/, diagnose/trajectory/)."""
    kinds = {"eval": [], "compare": [], "trajectory": []}
    for p in map(Path, inputs):
        kind = "eval" if p.parent.name == "eval" else p.parent.name
        if kind not in kinds:
            raise ValueError(f"findings: cannot tell what table {p} is (expected eval/, compare/ or trajectory/)")
        kinds[kind].append(p)
    evals = pl.concat([pl.read_parquet(p) for p in kinds["eval"]], how="diagonal_relaxed")
    compare = pl.concat([pl.read_parquet(p) for p in kinds["compare"]], how="diagonal_relaxed")
    trajectory = pl.concat([pl.read_parquet(p) for p in kinds["trajectory"]], how="diagonal_relaxed")
    groups = groups_of(list(methods))
    n_prompts = int(evals["n"].max())
    lines = [
        f"# {title}",
        "",
        "Generated from the evaluation, compare and trajectory tables; numbers only. Intervals are 95%: "
        "over seeds a Student-t interval (none for one seed); accuracy, and every change of a one-seed run "
        f"entry, a percentile bootstrap over the {n_prompts} held-out prompts. Each run entry lists its seeds; "
        "controls with one seed have no seed interval.",
        "",
    ]

    def eval_rows(run: str) -> pl.DataFrame:
        return evals.filter(pl.col("ref") == run).sort("step")

    def correct_at(run: str, last: bool) -> np.ndarray | None:
        rows = eval_rows(run)
        if rows.is_empty() or "correct" not in rows.columns:
            return None
        row = rows[-1] if last else rows[0]
        return np.asarray(row["correct"][0], dtype=np.float64)

    # ---- models
    lines += ["## Models (held-out)", ""]
    model_rows = []
    for ref, label in references.items():
        c = correct_at(ref, True)
        rows = eval_rows(ref)
        acc = _fmt(bootstrap_interval(c)) if c is not None else f"{rows['accuracy'][-1]:.3f}"
        nll = f"{rows['nll'][-1]:.4f}" if "nll" in rows.columns else "n/a"
        kl = f"{rows['reverse_kl'][-1]:.4f}" if "reverse_kl" in rows.columns else "n/a"
        model_rows.append([f"{label} ({ref})", acc, nll, kl])
    for group, runs in groups.items():
        init = inits[runs[0]]
        if init in methods or init in references:
            continue
        model_rows.append([f"init of {group} ({init})", "see step 0 below", "", ""])
    lines += _table(["model", "greedy accuracy", "NLL of demonstrations", "reverse KL to teacher"], model_rows)

    # ---- jobs
    lines += [
        "## Did each method do its job",
        "",
        "First checkpoint (the run's init) vs last. Accuracy: greedy held-out accuracy, mean over seeds; its change "
        "a paired bootstrap over prompts. Other changes: mean over seeds of (last - first) with a t interval over "
        "seeds, and beside it a paired bootstrap over prompts of the seed-mean change (every seed and both "
        "checkpoints resampled on the same prompts); with one seed that bootstrap decides. "
        "'yes': the deciding interval lies on the method's side of 0.",
        "",
    ]
    job_rows = []
    for group, runs in groups.items():
        method = methods[runs[0]]
        first = [correct_at(r, False) for r in runs]
        last = [correct_at(r, True) for r in runs]
        if all(c is not None for c in first + last):
            acc0, acc1 = bootstrap_interval(np.stack(first)), bootstrap_interval(np.stack(last))
            delta = bootstrap_interval(np.stack(last) - np.stack(first))
            acc0_s, acc1_s, delta_s = _fmt(acc0), _fmt(acc1), _fmt(delta)
            verdict = _verdict(delta, +1)
        else:
            acc0_s = acc1_s = delta_s = verdict = "n/a"
        cells = [group, method, str(len(runs)), acc0_s, acc1_s, delta_s, f"accuracy above init: {verdict}"]
        for metric, label, sign in JOBS.get(method, []):
            ends = [eval_rows(r) for r in runs]
            ends = [rows for rows in ends if metric in rows.columns and rows.height >= 2]
            seeds = seed_interval([rows[metric][-1] - rows[metric][0] for rows in ends])
            prompts = _prompt_change([rows[0] for rows in ends], [rows[-1] for rows in ends], metric) if ends else None
            deciding = prompts if seeds.n == 1 and prompts is not None else seeds
            side = "lower" if sign < 0 else "higher"
            shown = _fmt(seeds, 4)
            if prompts is not None:
                shown += f"; over prompts {_fmt(prompts, 4)}"
            cells[-1] += f"; {label} {side}: {_verdict(deciding, sign)} (change {shown})"
        job_rows.append(cells)
    lines += _table(
        ["run entry", "method", "seeds", "accuracy, init", "accuracy, last", "change", "did its job"], job_rows
    )

    twins = "; ".join(
        f"{', '.join(refs)} (identical at steps {', '.join(map(str, same))} of {', '.join(map(str, steps))})"
        for refs, same, steps in identical_runs(evals)
    )
    lines += ["Runs with identical held-out results at their last checkpoint (every metric and every "
              f"prompt's parts): {twins or 'none'}.", ""]  # fmt: skip

    # ---- per-checkpoint metrics
    lines += ["## Held-out metrics per checkpoint (mean over seeds [t interval])", ""]
    ck_rows = []
    for group, runs in groups.items():
        rows = evals.filter(pl.col("ref").is_in(runs))
        for step in sorted(rows["step"].unique().to_list()):
            at = rows.filter(pl.col("step") == step)
            cells = [group, str(step)]
            for metric in ("accuracy", "nll", "reverse_kl", "sampled_reward"):
                cells.append(_fmt(seed_interval(at[metric].to_list()), 4) if metric in at.columns else "n/a")
            ck_rows.append(cells)
    lines += _table(["run entry", "step", "accuracy", "NLL", "reverse KL", "sampled reward"], ck_rows)

    # ---- update budget and relative update
    matrices = layer_matrices(compare)
    w0 = (
        matrices.filter(pl.col("metric").is_in(["update_frobenius_norm", "relative_update_norm"]))
        .pivot(on="metric", index=["run", "tensor", "module", "parameters"], values="value")
        .with_columns(w0_norm=pl.col("update_frobenius_norm") / pl.col("relative_update_norm"))
        .filter(pl.col("w0_norm").is_finite())
        .with_columns(rms=pl.col("w0_norm") / pl.col("parameters").cast(pl.Float64).sqrt())
    )
    lines += [
        "## Update budget",
        "",
        "With AdamW a weight moves by about lr per step, so lr / rms(W0) is the per-step move relative to a "
        "weight's size and lr x steps / rms(W0) its upper bound over the run (peak lr). rms(W0) is measured on "
        "each run's initial layer matrices (median per module type over layers and seeds).",
        "",
    ]
    budget_rows = []
    for group, runs in groups.items():
        lr, steps = train[runs[0]]["lr"], train[runs[0]]["steps"]
        per_module = w0.filter(pl.col("run").is_in(runs)).group_by("module").agg(pl.col("rms").median()).sort("module")
        for row in per_module.iter_rows(named=True):
            budget_rows.append(
                [group, row["module"], f"{lr:.3g}", str(steps), f"{row['rms']:.4f}", f"{lr / row['rms']:.3g}",
                 f"{lr * steps / row['rms']:.3g}"]
            )  # fmt: skip
    if cluster:
        rms = cluster.get("weight_rms", 0.02)
        budget_rows.append(
            [f"cluster preset ({cluster.get('name', 'hub')})", "all (initializer range)", f"{cluster['lr']:.3g}",
             str(cluster["steps"]), f"{rms:.4f}", f"{cluster['lr'] / rms:.3g}",
             f"{cluster['lr'] * cluster['steps'] / rms:.3g}"]
        )  # fmt: skip
    lines += _table(["run entry", "module", "lr", "steps", "rms(W0)", "lr / rms", "lr x steps / rms"], budget_rows)

    traj = layer_matrices(trajectory.filter(pl.col("metric") == "frobenius_norm")).join(
        w0.select("run", "tensor", "w0_norm"), on=["run", "tensor"], how="inner"
    )
    per_step = traj.group_by("run", "step").agg(
        rel=(pl.col("value") ** 2).sum().sqrt() / (pl.col("w0_norm") ** 2).sum().sqrt()
    )
    lines += ["Measured ‖dW_t‖_F / ‖W0‖_F over all layer matrices together, per checkpoint:", ""]
    rel_rows = []
    for group, runs in groups.items():
        rows = per_step.filter(pl.col("run").is_in(runs))
        for step in sorted(rows["step"].unique().to_list()):
            rel_rows.append([group, str(step), _fmt(seed_interval(rows.filter(pl.col("step") == step)["rel"]), 4)])
    lines += _table(["run entry", "step", "‖dW‖_F / ‖W0‖_F"], rel_rows)

    # ---- per figure
    lines += [f"## Per figure (final checkpoint vs init; k = {k}, alpha = {alpha})", ""]
    fig_rows = []
    for figure, (description, kind, metric, summary) in FIGURE_QUANTITIES.items():
        source = compare if kind == "compare" else trajectory
        mats = layer_matrices(source.filter(pl.col("metric") == metric))
        for group, runs in groups.items():
            values = []
            for r in runs:
                rows = mats.filter(pl.col("run") == r)
                if rows.is_empty():
                    continue
                if kind == "trajectory":
                    steps = sorted(rows["step"].unique().to_list())
                    step = steps[(len(steps) - 1) // 2] if summary == "median-mid" else steps[-1]
                    rows = rows.filter(pl.col("step") == step)
                values.append(_scalar(rows, "median" if summary == "median-mid" else summary))
            fig_rows.append([figure, description, group, _fmt(seed_interval(values), 4)])
    lines += _table(["figure", "quantity", "run entry", "mean [t interval over seeds]"], fig_rows)

    text = "\n".join(lines)
    write_text(text, Path(f"{out_prefix}.md"))
    write_text(markdown_to_html(text, title), Path(f"{out_prefix}.html"))
    return text


def markdown_to_html(text: str, title: str) -> str:
    """The findings' markdown (headings, paragraphs, pipe tables) as one self-contained HTML page."""
    body, table = [], []

    def flush():
        if table:
            head, *rest = table
            cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
            body.append("<table><tr>" + cells(head, "th") + "</tr>")
            body.extend("<tr>" + cells(r, "td") + "</tr>" for r in rest)
            body.append("</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            row = line.strip("|").split("|")
            if not all(set(c.strip()) <= set("-:") for c in row):
                table.append(row)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}"
    )
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"
