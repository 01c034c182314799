"""Figures: tiny synthetic long-format tables in, PNG/PDF/CSV out; plotted values checked by hand."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest

from opdgeom.cli import main as cli_main
from opdgeom.figures import FIGURES
from opdgeom.figures.style import run_styles
from opdgeom.geometry.compare import SCHEMA as COMPARE_SCHEMA

DPI = 40
LAYERS = [0, 1, 2]
MODULES = ["q_proj", "k_proj", "down_proj"]
PARAMS = {"q_proj": 16, "k_proj": 8, "down_proj": 32}
METHODS = {"sft": "sft", "opd": "opd", "opd.topkl50": "opd", "rlvr": "rlvr", "mix.a05": "mix"}
COMPARE_METRICS = [
    "bf16_sparsity",
    "update_frobenius_norm",
    "relative_update_norm",
    "spectral_shift",
    "principal_angle_left_max",
    "principal_angle_left_mean",
    "principal_angle_right_max",
    "principal_angle_right_mean",
    "mask_overlap_principal",
    "mask_overlap_low_magnitude",
]
STEPS = [10, 20, 30]
TRAJECTORY_METRICS = ["frobenius_norm", "stable_rank", "tail_index", "subspace_similarity_to_final"]


def _value(rng, metric: str) -> float:
    if metric in (
        "bf16_sparsity",
        "mask_overlap_principal",
        "mask_overlap_low_magnitude",
        "subspace_similarity_to_final",
    ):
        return float(rng.uniform(0.01, 0.99))
    if metric.startswith("principal_angle"):
        return float(rng.uniform(0.01, 30.0))
    if metric == "spectral_shift":
        return float(10 ** rng.uniform(-6, -1))
    return float(rng.uniform(0.5, 20.0))


def _geometry_row(run, step, layer, module, metric, value, kind="matrix", tensor=None, parameters=None):
    return {
        "run": run,
        "step": step,
        "tensor": tensor or f"model.layers.{layer}.mlp.{module}.weight",
        "kind": kind,
        "layer": layer,
        "module": module,
        "metric": metric,
        "parameters": parameters if parameters is not None else PARAMS.get(module, 4),
        "value": value,
    }


# The workflow's comparison/trajectory tables: the geometry schema tagged with run and step.
SCHEMA = {"run": pl.String, "step": pl.Int64, **COMPARE_SCHEMA}


def _write(rows, path):
    pl.DataFrame(rows, schema=SCHEMA, orient="row").write_parquet(path)
    return path


@pytest.fixture
def comparison(tmp_path):
    """One comparison table per run; returns (paths, truth) with truth[(run, metric, layer, module)] = value."""
    rng = np.random.default_rng(0)
    paths, truth = [], {}
    for run in METHODS:
        rows = []
        for layer in LAYERS:
            for module in MODULES:
                for metric in COMPARE_METRICS:
                    value = _value(rng, metric)
                    truth[(run, metric, layer, module)] = value
                    rows.append(_geometry_row(run, 100, layer, module, metric, value))
        # things every figure must leave out: a norm vector, the embedding, and the aggregates
        rows.append(_geometry_row(run, 100, 0, "input_layernorm", "bf16_sparsity", 0.0, kind="vector", parameters=4))
        rows.append(
            _geometry_row(
                run,
                100,
                None,
                "embed_tokens",
                "spectral_shift",
                1e3,
                kind="embedding",
                tensor="model.embed_tokens.weight",
                parameters=64,
            )
        )
        sparsity = {"all:matrix": float(rng.uniform(0.1, 0.9)), "all:vector": 0.5, "module:q_proj": 0.3}
        truth[(run, "all:matrix")] = sparsity["all:matrix"]
        for tensor, value in sparsity.items():
            rows.append(
                _geometry_row(
                    run, 100, None, None, "bf16_sparsity", value, kind="matrix", tensor=tensor, parameters=1000
                )
            )
        paths.append(_write(rows, tmp_path / f"compare_{run}.parquet"))
    return paths, truth


@pytest.fixture
def trajectory(tmp_path):
    """One trajectory table per run; truth[(run, metric, step, layer, module)] = value (some tail_index NaN)."""
    rng = np.random.default_rng(1)
    paths, truth = [], {}
    for run in METHODS:
        rows = []
        for step in STEPS:
            for layer in LAYERS:
                for module in MODULES:
                    for metric in TRAJECTORY_METRICS:
                        value = _value(rng, metric)
                        if metric == "tail_index" and layer == 0 and module == "q_proj":
                            value = math.nan  # too few singular values: the figure must skip it
                        truth[(run, metric, step, layer, module)] = value
                        rows.append(_geometry_row(run, step, layer, module, metric, value))
            rows.append(
                _geometry_row(
                    run,
                    step,
                    None,
                    "embed_tokens",
                    "frobenius_norm",
                    1e6,
                    kind="embedding",
                    tensor="model.embed_tokens.weight",
                )
            )
        paths.append(_write(rows, tmp_path / f"trajectory_{run}.parquet"))
    return paths, truth


@pytest.fixture
def evaluations(tmp_path):
    rng = np.random.default_rng(2)
    refs = ["sft", "sft.projgrad", "sft.projupdate", "opd", "opd.projgrad", "opd.projupdate"]
    paths, truth = [], {}
    for ref in [*refs, "student"]:
        steps = [0] if ref == "student" else [0, 50, 100]
        rows = []
        for step in steps:
            acc = float(rng.uniform(0, 1))
            truth[(ref, step)] = acc
            rows.append(
                {
                    "ref": ref,
                    "step": step,
                    "tokens": step * 1000,
                    "domain": "math",
                    "accuracy": acc,
                    "n": 64,
                    "mean_completion_tokens": 12.5,
                }
            )
        path = tmp_path / f"eval_{ref}.parquet"
        pl.DataFrame(rows).write_parquet(path)
        paths.append(path)
    methods = {r: r.split(".")[0] for r in refs}
    return paths, truth, methods


def _check_outputs(prefix) -> pl.DataFrame:
    png, pdf, csv = (prefix.with_name(f"{prefix.name}.{ext}") for ext in ("png", "pdf", "csv"))
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    assert pdf.read_bytes().startswith(b"%PDF")
    image = mpimg.imread(png)
    rgb = image[..., :3]
    assert rgb.std() > 0, "blank PNG"
    assert (rgb < 0.99).mean() > 0.005, "PNG is almost all white"
    assert not list(prefix.parent.glob(".*.tmp*")), "temporary files left behind"
    return pl.read_csv(csv)


def _median(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.median(values))


# --- figures on comparison tables -------------------------------------------------------------


def test_rotation_plots_per_layer_median_of_max_angles(comparison, tmp_path):
    paths, truth = comparison
    prefix = tmp_path / "out" / "rotation"
    FIGURES["rotation"](paths, prefix, methods=METHODS, dpi=DPI)
    csv = _check_outputs(prefix)
    assert csv["run"].unique(maintain_order=True).to_list() == list(METHODS)
    assert set(csv["metric"]) == {"principal_angle_left_max", "principal_angle_right_max"}
    for run in METHODS:
        for side in ("left", "right"):
            for layer in LAYERS:
                expected = _median([truth[(run, f"principal_angle_{side}_max", layer, m)] for m in MODULES])
                got = csv.filter(pl.col("run") == run, pl.col("side") == side, pl.col("layer") == layer)
                assert got.height == 1 and got["value"][0] == pytest.approx(expected)
                assert got["method"][0] == METHODS[run] and got["n_matrices"][0] == len(MODULES)


def test_rotation_mean_statistic_and_run_subset(comparison, tmp_path):
    paths, truth = comparison
    prefix = tmp_path / "rotation_mean"
    FIGURES["rotation"](paths, prefix, methods=METHODS, runs=["opd", "sft"], statistic="mean", summary="max", dpi=DPI)
    csv = _check_outputs(prefix)
    assert set(csv["run"]) == {"opd", "sft"}
    got = csv.filter(pl.col("run") == "opd", pl.col("side") == "right", pl.col("layer") == 2)["value"][0]
    assert got == pytest.approx(max(truth[("opd", "principal_angle_right_mean", 2, m)] for m in MODULES))


def test_drift_plots_median_nss_per_module(comparison, tmp_path):
    paths, truth = comparison
    prefix = tmp_path / "drift"
    FIGURES["drift"](paths, prefix, methods=METHODS, dpi=DPI)
    csv = _check_outputs(prefix)
    assert set(csv["run"]) == set(METHODS)
    assert csv["module"].unique(maintain_order=True).to_list() == ["q_proj", "k_proj", "down_proj", "all matrices"]
    for run in METHODS:
        for module in MODULES:
            values = [truth[(run, "spectral_shift", layer, module)] for layer in LAYERS]
            got = csv.filter(pl.col("run") == run, pl.col("module") == module)
            assert got["value"][0] == pytest.approx(_median(values))
            assert got["q25"][0] == pytest.approx(np.quantile(values, 0.25))
        overall = [truth[(run, "spectral_shift", layer, m)] for layer in LAYERS for m in MODULES]
        got = csv.filter(pl.col("run") == run, pl.col("module") == "all matrices")
        assert got["value"][0] == pytest.approx(_median(overall))  # the embedding's 1e3 is left out
        assert got["n_matrices"][0] == len(LAYERS) * len(MODULES)


def test_localization_density_and_weighted_overlaps(comparison, tmp_path):
    paths, truth = comparison
    prefix = tmp_path / "localization"
    FIGURES["localization"](paths, prefix, methods=METHODS, alpha=0.05, dpi=DPI)
    csv = _check_outputs(prefix)
    assert set(csv["metric"]) == {"update_density", "mask_overlap_principal", "mask_overlap_low_magnitude"}
    total = sum(PARAMS[m] for m in MODULES) * len(LAYERS)
    for run in METHODS:
        density = csv.filter(pl.col("run") == run, pl.col("metric") == "update_density")
        assert density["value"][0] == pytest.approx(1 - truth[(run, "all:matrix")])
        for metric in ("mask_overlap_principal", "mask_overlap_low_magnitude"):
            expected = sum(truth[(run, metric, layer, m)] * PARAMS[m] for layer in LAYERS for m in MODULES) / total
            got = csv.filter(pl.col("run") == run, pl.col("metric") == metric)
            assert got["value"][0] == pytest.approx(expected)
            assert got["baseline"][0] == pytest.approx(0.05)


def test_localization_requires_alpha(comparison, tmp_path):
    paths, _ = comparison
    with pytest.raises(ValueError, match="alpha"):
        FIGURES["localization"](paths, tmp_path / "loc", methods=METHODS, dpi=DPI)


def test_heatmap_cells_are_per_tensor_density_and_nss(comparison, tmp_path):
    paths, truth = comparison
    prefix = tmp_path / "heatmap"
    FIGURES["heatmap"](paths, prefix, methods=METHODS, columns=3, dpi=DPI)
    csv = _check_outputs(prefix)
    assert set(csv["run"]) == set(METHODS)
    assert set(csv["metric"]) == {"update_density", "spectral_shift"}
    assert csv.height == 2 * len(METHODS) * len(LAYERS) * len(MODULES)  # no vector, embedding or aggregate
    for run in METHODS:
        for layer in LAYERS:
            for module in MODULES:
                cell = csv.filter(pl.col("run") == run, pl.col("layer") == layer, pl.col("module") == module)
                density = cell.filter(pl.col("metric") == "update_density")["value"][0]
                nss = cell.filter(pl.col("metric") == "spectral_shift")["value"][0]
                assert density == pytest.approx(1 - truth[(run, "bf16_sparsity", layer, module)])
                assert nss == pytest.approx(truth[(run, "spectral_shift", layer, module)])


# --- trajectory figures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, metric, summary",
    [
        ("fig4a", "stable_rank", "median"),
        ("fig4b", "frobenius_norm", "root_sum_square"),
        ("fig4c", "tail_index", "median"),
        ("fig5", "subspace_similarity_to_final", "median"),
    ],
)
def test_trajectory_figures_summarise_matrices_per_step(trajectory, tmp_path, name, metric, summary):
    paths, truth = trajectory
    prefix = tmp_path / name
    FIGURES[name](paths, prefix, methods=METHODS, dpi=DPI)
    csv = _check_outputs(prefix)
    assert csv["run"].unique(maintain_order=True).to_list() == list(METHODS)
    assert set(csv["metric"]) == {metric} and set(csv["summary"]) == {summary}
    for run in METHODS:
        line = csv.filter(pl.col("run") == run)
        assert line["step"].to_list() == STEPS
        for step, value in zip(line["step"], line["value"]):
            values = [truth[(run, metric, step, layer, m)] for layer in LAYERS for m in MODULES]
            if summary == "median":
                expected = _median(values)
            else:
                expected = math.sqrt(sum(v * v for v in values))  # the embedding's 1e6 is left out
            assert value == pytest.approx(expected)
    if metric == "tail_index":
        assert set(csv["n_matrices"]) == {len(LAYERS) * len(MODULES) - 1} and set(csv["n_nan"]) == {1}


@pytest.mark.parametrize("name", ["fig7a", "fig7b", "fig7c"])
def test_control_figures_draw_only_their_runs(trajectory, tmp_path, name):
    paths, truth = trajectory
    runs = ["opd", "opd.topkl50"] if name != "fig7c" else ["opd", "rlvr", "mix.a05"]
    prefix = tmp_path / name
    FIGURES[name](paths, prefix, methods=METHODS, runs=runs, dpi=DPI)
    csv = _check_outputs(prefix)
    assert csv["run"].unique(maintain_order=True).to_list() == runs
    got = csv.filter(pl.col("run") == runs[-1], pl.col("step") == 20)["value"][0]
    assert got == pytest.approx(
        _median([truth[(runs[-1], "stable_rank", 20, layer, m)] for layer in LAYERS for m in MODULES])
    )


def test_fig7_shares_fig4a_implementation():
    assert FIGURES["fig7a"].__code__ is FIGURES["fig4a"].__code__


# --- evaluation figures -------------------------------------------------------------------


def test_fig6_two_panels_of_accuracy(evaluations, tmp_path):
    paths, truth, methods = evaluations
    groups = {"OPD": ["opd", "opd.projgrad", "opd.projupdate"], "SFT": ["sft", "sft.projgrad", "sft.projupdate"]}
    prefix = tmp_path / "fig6"
    FIGURES["fig6"](paths, prefix, methods=methods, groups=groups, references={"student": "base"}, dpi=DPI)
    csv = _check_outputs(prefix)
    for group, runs in groups.items():
        rows = csv.filter(pl.col("group") == group)
        assert rows["run"].unique(maintain_order=True).to_list() == runs
        for row in rows.iter_rows(named=True):
            assert row["accuracy"] == pytest.approx(truth[(row["run"], row["step"])])
    ref = csv.filter(pl.col("group") == "reference")
    assert ref["run"].to_list() == ["student"] and ref["accuracy"][0] == pytest.approx(truth[("student", 0)])


def test_fig6_unknown_run_in_groups(evaluations, tmp_path):
    paths, _, methods = evaluations
    with pytest.raises(ValueError, match="opd.nope"):
        FIGURES["fig6"](paths, tmp_path / "f", methods=methods, groups={"OPD": ["opd", "opd.nope"]}, dpi=DPI)
    with pytest.raises(ValueError, match="rlvr"):
        FIGURES["fig6"](paths, tmp_path / "f", methods={**methods, "rlvr": "rlvr"}, groups={"X": ["rlvr"]}, dpi=DPI)


def test_accuracy_figure(evaluations, tmp_path):
    paths, _, methods = evaluations
    prefix = tmp_path / "accuracy"
    FIGURES["accuracy"](paths, prefix, methods=methods, references={"student": "base"}, dpi=DPI)
    csv = _check_outputs(prefix)
    assert set(methods) <= set(csv["ref"])


def test_table1(comparison, tmp_path):
    paths, truth = comparison
    wide = FIGURES["table1"](paths, tmp_path / "table1", methods=METHODS)
    assert wide["run"].to_list() == list(METHODS)
    assert wide["matrices"].to_list() == pytest.approx([truth[(r, "all:matrix")] for r in METHODS])
    assert (tmp_path / "table1.md").read_text().startswith("Table 1.")


# --- style and errors ----------------------------------------------------------------------


def test_runs_of_one_method_share_colour_but_not_line():
    methods = {"sft": "sft", **{f"opd.v{i}": "opd" for i in range(12)}, "opd": "opd", "rlvr": "rlvr"}
    styles = run_styles(methods)
    look = {run: (s.linestyle, s.marker, s.filled) for run, s in styles.items()}
    opd_runs = [r for r, m in methods.items() if m == "opd"]
    assert len({look[r] for r in opd_runs}) == len(opd_runs)
    assert {styles[r].color for r in opd_runs} == {styles["opd.v0"].color} != {styles["sft"].color}
    # the plain run (first of its method) looks the same in every figure; variants differ within a figure
    subset = run_styles(methods, ["opd.v3", "opd.v7", "opd.v0"])
    assert subset["opd.v0"] == styles["opd.v0"] and subset["opd.v0"].linestyle == "-"
    assert len({(s.linestyle, s.marker) for s in subset.values()}) == 3


def _without_metric(paths, metric, tmp_path):
    out = []
    for path in paths:
        table = pl.read_parquet(path).filter(pl.col("metric") != metric)
        out.append(tmp_path / f"no_{metric}_{path.name}")
        table.write_parquet(out[-1])
    return out


@pytest.mark.parametrize(
    "name, metric, options",
    [
        ("rotation", "principal_angle_left_max", {}),
        ("drift", "spectral_shift", {}),
        ("localization", "mask_overlap_low_magnitude", {"alpha": 0.05}),
        ("heatmap", "bf16_sparsity", {}),
    ],
)
def test_missing_metric_is_named(comparison, tmp_path, name, metric, options):
    paths, _ = comparison
    with pytest.raises(ValueError, match=metric):
        FIGURES[name](_without_metric(paths, metric, tmp_path), tmp_path / name, methods=METHODS, dpi=DPI, **options)
    assert not (tmp_path / f"{name}.png").exists()


@pytest.mark.parametrize("name", ["fig4a", "fig4b", "fig4c", "fig5"])
def test_missing_trajectory_metric_is_named(trajectory, tmp_path, name):
    paths, _ = trajectory
    metric = {
        "fig4a": "stable_rank",
        "fig4b": "frobenius_norm",
        "fig4c": "tail_index",
        "fig5": "subspace_similarity_to_final",
    }[name]
    with pytest.raises(ValueError, match=metric):
        FIGURES[name](_without_metric(paths, metric, tmp_path), tmp_path / name, methods=METHODS, dpi=DPI)


def test_metric_missing_for_one_run_names_run_and_file(comparison, tmp_path):
    paths, _ = comparison
    broken = list(paths)
    broken[1] = _without_metric([paths[1]], "spectral_shift", tmp_path)[0]
    with pytest.raises(ValueError, match=r"spectral_shift.*'opd'.*no_spectral_shift_compare_opd"):
        FIGURES["drift"](broken, tmp_path / "drift", methods=METHODS, dpi=DPI)


def test_bad_inputs_raise_value_error(comparison, trajectory, tmp_path):
    paths, _ = comparison
    with pytest.raises(ValueError, match="opd.nope"):
        FIGURES["drift"](paths, tmp_path / "d", methods={**METHODS, "opd.nope": "opd"}, dpi=DPI)
    with pytest.raises(ValueError, match="opd.nope"):
        FIGURES["fig4a"](trajectory[0], tmp_path / "t", methods=METHODS, runs=["opd", "opd.nope"], dpi=DPI)
    empty = tmp_path / "empty.parquet"
    pl.DataFrame(schema=SCHEMA).write_parquet(empty)
    with pytest.raises(ValueError, match="empty.parquet"):
        FIGURES["rotation"]([*paths, empty], tmp_path / "r", methods=METHODS, dpi=DPI)
    with pytest.raises(ValueError, match="appears in both"):
        FIGURES["rotation"]([*paths, paths[0]], tmp_path / "r", methods=METHODS, dpi=DPI)
    with pytest.raises(ValueError, match="methods"):
        FIGURES["rotation"](paths, tmp_path / "r", methods={}, dpi=DPI)


def test_cli_draws_figure_and_reports_bad_input(trajectory, tmp_path, capsys):
    paths, _ = trajectory
    prefix = tmp_path / "cli" / "fig5"
    options = json.dumps({"methods": METHODS, "runs": ["sft", "opd"], "dpi": DPI})
    args = ["figure", "fig5", "--inputs", *map(str, paths), "--out-prefix", str(prefix), "--options", options]
    assert cli_main(args) == 0
    assert set(_check_outputs(prefix)["run"]) == {"sft", "opd"}
    bad = json.dumps({"methods": METHODS, "runs": ["ghost"], "dpi": DPI})
    args = ["figure", "fig5", "--inputs", *map(str, paths), "--out-prefix", str(prefix), "--options", bad]
    assert cli_main(args) == 1
    assert "ghost" in capsys.readouterr().err


def test_every_figure_has_a_caption(repo):
    for name in FIGURES:
        caption = repo / "workflow" / "report" / f"{name}.rst"
        assert caption.exists() and caption.read_text().strip(), caption


def test_captions_are_valid_rst(repo):
    import io

    core = pytest.importorskip("docutils.core")
    for caption in sorted((repo / "workflow" / "report").glob("*.rst")):
        warnings = io.StringIO()
        core.publish_string(
            caption.read_text(),
            writer="null",
            settings_overrides={"warning_stream": warnings, "report_level": 1, "halt_level": 5},
        )
        assert not warnings.getvalue(), f"{caption}: {warnings.getvalue()}"


def test_accuracy_figure_names_missing_run(evaluations, tmp_path):
    paths, _, methods = evaluations
    with pytest.raises(ValueError, match="ghost"):
        FIGURES["accuracy"](paths, tmp_path / "acc", methods={**methods, "ghost": "opd"}, references={}, dpi=DPI)
    assert not (tmp_path / "acc.csv").exists()
