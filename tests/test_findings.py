"""The findings page, built from small fixed tables."""

import numpy as np
import polars as pl
import pytest

from opdgeom import stats
from opdgeom.figures import FIGURES


def _eval(ref, rows):
    rows = [(s, c * 10, nll, kl, rw) for s, c, nll, kl, rw in rows]  # 100 prompts
    return pl.DataFrame(
        [{"ref": ref, "step": s, "tokens": 0, "domain": "math", "accuracy": sum(c) / len(c), "n": len(c),
          "mean_completion_tokens": 5.0, "nll": nll, "correct": c, "reverse_kl": kl, "sampled_reward": rw}
         for s, c, nll, kl, rw in rows],
        schema_overrides={"correct": pl.List(pl.Int8)},
    )  # fmt: skip


def _geom(run, metrics, step=None):
    rows = []
    for tensor, module, params in (("model.layers.0.mlp.up_proj.weight", "up_proj", 300),
                                   ("model.layers.0.self_attn.q_proj.weight", "q_proj", 100)):  # fmt: skip
        for metric, value in metrics.items():
            row = {"run": run, "tensor": tensor, "kind": "matrix", "layer": 0, "module": module,
                   "metric": metric, "parameters": params, "value": value}  # fmt: skip
            if step is not None:
                row["step"] = step
            rows.append(row)
    return pl.DataFrame(rows)


def _trajectory_metrics(step: int) -> dict:
    return {"frobenius_norm": 0.1 * step / 10, "stable_rank": 2.0 + step / 10, "tail_index": 1.5,
            "subspace_similarity_to_final": step / 10}  # fmt: skip


def _write_geometry(tmp_path, sparsity_by_run: dict) -> list:
    """compare and trajectory tables of each run (two layer matrices, checkpoints 5 and 10)."""
    paths = []
    for run, sparsity in sparsity_by_run.items():
        compare = _geom(run, {"bf16_sparsity": sparsity, "update_frobenius_norm": 0.1, "relative_update_norm": 0.01,
                              "principal_angle_right_max": 1.0, "spectral_shift": 1e-3,
                              "mask_overlap_principal": 0.05, "mask_overlap_low_magnitude": 0.06})  # fmt: skip
        paths.append(tmp_path / "compare" / f"{run}.parquet")
        compare.write_parquet(paths[-1])
        traj = pl.concat([_geom(run, _trajectory_metrics(s), step=s) for s in (5, 10)])
        paths.append(tmp_path / "trajectory" / f"{run}.parquet")
        traj.write_parquet(paths[-1])
    return paths


def test_findings_page_from_fixed_tables(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "compare").mkdir()
    (tmp_path / "trajectory").mkdir()
    n = 10
    anchor = [1] * 3 + [0] * 7
    paths = []
    evals = {
        "student": [(0, [0] * n, 3.0, 2.0, 0.0)],
        "teacher.math": [(0, [1] * 9 + [0], 0.5, 0.0, 0.9)],
        # OPD, two seeds: accuracy 0.3 -> 0.6 / 0.5, reverse KL 1.0 -> 0.5 / 0.6
        "opd.s0": [(0, anchor, 1.0, 1.0, 0.3), (10, [1] * 6 + [0] * 4, 0.9, 0.5, 0.5)],
        "opd.s1": [(0, anchor, 1.0, 1.0, 0.3), (10, [1] * 5 + [0] * 5, 0.9, 0.6, 0.4)],
        # RLVR, one seed: accuracy unchanged
        "rlvr": [(0, anchor, 1.0, 1.0, 0.3), (10, anchor, 1.0, 1.1, 0.3)],
    }
    for ref, rows in evals.items():
        paths.append(tmp_path / "eval" / f"{ref}.parquet")
        _eval(ref, rows).write_parquet(paths[-1])
    paths += _write_geometry(tmp_path, {"opd.s0": 0.9, "opd.s1": 0.8, "rlvr": 0.5})
    methods = {"opd.s0": "opd", "opd.s1": "opd", "rlvr": "rlvr"}
    text = FIGURES["findings"](
        paths,
        tmp_path / "findings",
        methods=methods,
        references={"student": "base", "teacher.math": "teacher"},
        inits={r: "sft" for r in methods},
        train={r: {"lr": 1e-4, "steps": 10} for r in methods},
        cluster={"name": "qwen3-8b", "lr": 1e-6, "steps": 200, "weight_rms": 0.02},
    )
    assert (tmp_path / "findings.md").read_text() == text
    assert "<table>" in (tmp_path / "findings.html").read_text()
    lines = text.splitlines()
    opd = next(line for line in lines if line.startswith("| opd | opd | 2 |"))
    # accuracy 0.3 -> mean(0.6, 0.5) = 0.55; KL change -0.5 and -0.4 (t interval over two seeds spans < 0)
    assert "| 0.300 [" in opd and "| 0.550 [" in opd and "accuracy above init: yes" in opd
    assert "reverse KL to teacher lower: unresolved" in opd or "reverse KL to teacher lower: yes" in opd
    rlvr = next(line for line in lines if line.startswith("| rlvr | rlvr | 1 |"))
    assert "accuracy above init: unresolved" in rlvr and "sampled reward higher: one seed, no interval" in rlvr
    assert "| base (student) | 0.000 [0.000, 0.000] |" in text
    # table 1 quantity: parameter-weighted sparsity, mean over the two OPD seeds = 0.85
    assert any(line.startswith("| table1 |") and "| opd | 0.8500 [" in line for line in lines)
    # budget: rms(W0) = (0.1 / 0.01) / sqrt(params); the cluster row is 1e-6 / 0.02 = 5e-05 per step
    assert "| cluster preset (qwen3-8b) | all (initializer range) | 1e-06 | 200 | 0.0200 | 5e-05 | 0.01 |" in text
    up = next(line for line in lines if line.startswith("| opd | up_proj | 0.0001 | 10 |"))
    assert f"| {10 / 300**0.5:.4f} |" in up
    # relative update at the last step: sqrt(2 * 0.1^2) / sqrt(2 * 10^2) = 0.01
    assert "| opd | 10 | 0.0100" in text
    assert "||" not in text  # every table row keeps its columns
    assert (
        "Runs with identical held-out results at their last checkpoint (every metric and every prompt's parts): none."
        in text
    )


def test_budget_figure_pools_seeds_per_method_and_budget(tmp_path):
    (tmp_path / "compare").mkdir()
    (tmp_path / "trajectory").mkdir()
    paths, budgets, methods = [], {}, {}
    for method in ("sft", "opd"):
        for b, lr_steps in enumerate((1e-4, 1e-2)):
            for seed, sparsity in enumerate((0.9 - 0.4 * b, 0.8 - 0.4 * b)):
                run = f"{method}.b{b}.s{seed}"
                budgets[run], methods[run] = lr_steps, method
                compare = _geom(run, {"bf16_sparsity": sparsity, "update_frobenius_norm": 0.2,
                                      "relative_update_norm": 0.01, "principal_angle_right_max": 1.0 + b})  # fmt: skip
                paths.append(tmp_path / "compare" / f"{run}.parquet")
                compare.write_parquet(paths[-1])
                paths.append(tmp_path / "trajectory" / f"{run}.parquet")
                _geom(run, {"stable_rank": 3.0 + seed}, step=10).write_parquet(paths[-1])
    data = FIGURES["budget"](paths, tmp_path / "budget", methods=methods, budgets=budgets)
    assert (tmp_path / "budget.png").stat().st_size > 0
    row = data.filter(pl.col("group") == "opd.b1", pl.col("metric") == "bf16_sparsity")
    assert row["mean"][0] == 0.45 and row["n_seeds"][0] == 2 and row["lo"][0] < 0.45 < row["hi"][0]
    # budget = lr x steps / median rms(W0); ||W0||_F = 0.2 / 0.01 = 20 for matrices of 300 and 100 weights
    rms = sorted([20 / 300**0.5, 20 / 100**0.5])
    assert row["budget"][0] == pytest.approx(1e-2 / ((rms[0] + rms[1]) / 2))
    sr = data.filter(pl.col("group") == "sft.b0", pl.col("metric") == "stable_rank")
    assert sr["mean"][0] == 3.5


def _with_prompt_parts(table: pl.DataFrame, kl_per_prompt, reward_per_prompt, tokens: int = 4) -> pl.DataFrame:
    """Per-prompt parts of the sampled metrics, each row's scalars recomputed from them."""
    n = len(table["correct"][0])
    kl_sums = [[kl * tokens for kl in kl_per_prompt[i]] for i in range(table.height)]
    return table.with_columns(
        reverse_kl=pl.Series([sum(k) / (tokens * n) for k in kl_sums]),
        sampled_reward=pl.Series([sum(r) / n for r in reward_per_prompt]),
        kl_sum_per_prompt=pl.Series(kl_sums, dtype=pl.List(pl.Float64)),
        kl_tokens_per_prompt=pl.Series([[tokens] * n] * table.height, dtype=pl.List(pl.Int64)),
        reward_per_prompt=pl.Series(reward_per_prompt, dtype=pl.List(pl.Float64)),
    )


def test_one_seed_jobs_are_decided_by_a_paired_bootstrap_over_prompts(tmp_path):
    for d in ("eval", "compare", "trajectory"):
        (tmp_path / d).mkdir()
    n = 40
    anchor = [1] + [0] * 3  # 40 prompts (_eval repeats it 10 times)
    rng = np.random.default_rng(0)
    kl0 = 0.5 + 0.2 * rng.random(n)
    reward0 = rng.random(n)
    tables = {
        # one seed: KL lower on every prompt by 0.1 -> "yes"; reward unchanged up to noise -> "unresolved"
        "opd": _with_prompt_parts(_eval("opd", [(0, anchor, 1.0, 0, 0), (10, anchor, 1.0, 0, 0)]),
                                  [kl0, kl0 - 0.1], [reward0, reward0]),  # fmt: skip
        "rlvr": _with_prompt_parts(_eval("rlvr", [(0, anchor, 1.0, 0, 0), (10, anchor, 1.0, 0, 0)]),
                                   [kl0, kl0], [reward0, np.clip(reward0 + 0.02 * rng.standard_normal(n), 0, 1)]),
        # two seeds: the deciding interval is over seeds; over prompts is shown beside it
        "mix.s0": _with_prompt_parts(_eval("mix.s0", [(0, anchor, 1.0, 0, 0), (10, anchor, 1.0, 0, 0)]),
                                     [kl0, kl0 - 0.05], [reward0, np.minimum(reward0 + 0.1, 1)]),
        "mix.s1": _with_prompt_parts(_eval("mix.s1", [(0, anchor, 1.0, 0, 0), (10, anchor, 1.0, 0, 0)]),
                                     [kl0, kl0 + 0.04], [reward0, np.minimum(reward0 + 0.1, 1)]),
    }  # fmt: skip
    paths = []
    for ref, table in tables.items():
        paths.append(tmp_path / "eval" / f"{ref}.parquet")
        table.write_parquet(paths[-1])
    paths += _write_geometry(tmp_path, {r: 0.5 for r in tables})
    tables["sft"] = _eval("sft", [(0, anchor, 2.0, 0, 0), (10, anchor, 1.0, 0, 0)])  # written before NLL parts
    # NLL parts: per prompt a summed NLL over 5 demonstration tokens; lower on 39 prompts, higher on one
    nll0 = 2.0 + rng.random(n)
    nll1 = nll0 - np.where(np.arange(n) == 0, -0.5, 0.3)
    tables["sft.parts"] = _eval("sft.parts", [(0, anchor, 0, 0, 0), (10, anchor, 0, 0, 0)]).with_columns(
        nll=pl.Series([nll0.mean(), nll1.mean()]),
        nll_sum_per_prompt=pl.Series([list(5 * nll0), list(5 * nll1)], dtype=pl.List(pl.Float64)),
        nll_tokens_per_prompt=pl.Series([[5] * n] * 2, dtype=pl.List(pl.Int64)),
    )
    for ref in ("sft", "sft.parts"):
        paths.append(tmp_path / "eval" / f"{ref}.parquet")
        tables[ref].write_parquet(paths[-1])
    paths += _write_geometry(tmp_path, {"sft": 0.5, "sft.parts": 0.5})
    methods = {"opd": "opd", "rlvr": "rlvr", "mix.s0": "mix", "mix.s1": "mix", "sft": "sft", "sft.parts": "sft"}
    text = FIGURES["findings"](
        paths, tmp_path / "findings", methods=methods, references={}, inits={r: "sft" for r in methods},
        train={r: {"lr": 1e-4, "steps": 10} for r in methods},
    )  # fmt: skip
    lines = text.splitlines()
    opd = next(line for line in lines if line.startswith("| opd | opd | 1 |"))
    assert "reverse KL to teacher lower: yes (change -0.1000; over prompts -0.1000 [-0.1000, -0.1000])" in opd
    rlvr = next(line for line in lines if line.startswith("| rlvr | rlvr | 1 |"))
    assert "sampled reward higher: unresolved" in rlvr and "over prompts" in rlvr
    mix = next(line for line in lines if line.startswith("| mix | mix | 2 |"))
    # seed changes -0.05 and +0.04: the t interval spans 0 -> unresolved, although over prompts the
    # seed-mean change (-0.005 on every prompt) has no spread
    assert "reverse KL to teacher lower: unresolved (change -0.0050 [" in mix
    assert "over prompts -0.0050 [-0.0050, -0.0050]" in mix
    sft = next(line for line in lines if line.startswith("| sft | sft | 1 |"))
    assert "held-out NLL lower: one seed, no interval: lower (change -1.0000)" in sft
    parts = next(line for line in lines if line.startswith("| sft.parts | sft | 1 |"))
    change = (nll1 - nll0).mean()
    boot = stats.bootstrap_statistic(lambda a, b: float((b - a).mean()), [nll0[None], nll1[None]])
    assert boot.hi < 0 and f"held-out NLL lower: yes (change {change:.4f}; over prompts {boot.format(4)})" in parts


def test_runs_with_identical_held_out_results_are_named(tmp_path):
    from opdgeom.figures.findings import identical_runs

    anchor = [1] * 3 + [0] * 7
    middle = [1] * 4 + [0] * 6
    trained = [1] * 5 + [0] * 5
    evals = pl.concat(
        [
            _eval(
                "opd.topkl50", [(0, anchor, 1.0, 1.0, 0.3), (5, middle, 0.95, 0.7, 0.4), (10, trained, 0.9, 0.5, 0.5)]
            ),
            # the same last checkpoint reached by another path: grouped, identical at step 10 only
            _eval(
                "opd.topkl25", [(0, anchor, 1.0, 1.0, 0.3), (5, middle, 0.95, 0.71, 0.4), (10, trained, 0.9, 0.5, 0.5)]
            ),
            # same accuracy and scalars, other prompts correct: not the same results
            _eval(
                "opd.rand50",
                [(0, anchor, 1.0, 1.0, 0.3), (5, middle, 0.95, 0.7, 0.4), (10, trained[::-1], 0.9, 0.5, 0.5)],
            ),
            # same init and same middle checkpoint only: step 0 does not count, the last one differs
            _eval("opd.rand25", [(0, anchor, 1.0, 1.0, 0.3), (5, middle, 0.95, 0.7, 0.4), (10, anchor, 0.9, 0.5, 0.5)]),
        ]
    )
    assert identical_runs(evals) == [(["opd.topkl25", "opd.topkl50"], [10], [5, 10])]
    copy = evals.filter(pl.col("ref") == "opd.topkl50").with_columns(ref=pl.lit("opd.copy"))
    same_path = pl.concat([evals.filter(pl.col("ref") != "opd.topkl25"), copy])
    assert identical_runs(same_path) == [(["opd.copy", "opd.topkl50"], [5, 10], [5, 10])]
    assert identical_runs(evals.filter(pl.col("ref") != "opd.topkl25")) == []
