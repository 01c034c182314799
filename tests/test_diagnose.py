"""opdgeom diagnose: every checkpoint layout gives the tables of the same weights as plain HF folders; LoRA
matches the merged model's float64 result; the page renders in a real headless Chromium."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import transformers
from polars.testing import assert_frame_equal
from safetensors.torch import save_file

from opdgeom.diagnose.sources import detect_run
from opdgeom.geometry.compare import compare_checkpoints
from opdgeom.geometry.trajectory import trajectory_table

REPO = Path(__file__).resolve().parents[1]
STEPS = [10, 20, 30]
CONFIG = dict(
    vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
K = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def diagnose(*args, cache: Path, hub: Path | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "OPDGEOM_CACHE": str(cache), **({"HF_HUB_CACHE": str(hub)} if hub else {})}
    cmd = [sys.executable, "-m", "opdgeom", "diagnose", *map(str, args), "--k", str(K), "--trajectory-k", str(K)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)


def write_folder(folder: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        return folder
    names, weight_map = sorted(state), {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names[i::shards]}, str(folder / shard))
        weight_map.update({n: shard for n in names[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A bf16 base (in an HF cache tree, sharded), three checkpoints in every layout, and LoRA adapters."""
    root = tmp_path_factory.mktemp("diagnose")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**CONFIG)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config_dict = json.loads(config.to_json_string())
    base = write_folder(root / "base", base_state, config_dict, shards=2)
    snapshot = hub_cache(root / "hub", "tiny-org/tiny-base", base)
    gen = torch.Generator().manual_seed(1)
    noise = {
        k: torch.randn(v.shape, generator=gen) * (torch.rand(v.shape, generator=gen) < 0.3)
        for k, v in base_state.items()
    }
    plain, states = [], {}
    for step in STEPS:
        states[step] = {k: (v.double() + 0.02 * step / 30 * noise[k]).to(torch.bfloat16) for k, v in base_state.items()}
        plain.append(write_folder(root / "plain" / f"step{step}", states[step], config_dict))
        write_folder(root / "trl" / f"checkpoint-{step}", states[step], config_dict)
        write_folder(root / "verl" / f"global_step_{step}" / "actor" / "huggingface", states[step], config_dict, 3)
        (root / "verl" / f"global_step_{step}" / "actor" / "extra_state_world_size_1_rank_0.pt").write_bytes(b"")
    # quirks: fp32, names without "model.", lm_head tied to embed_tokens, one extra and one missing tensor
    quirks_ref = []
    for step in STEPS[:2]:
        fp32 = {k: v.float() for k, v in states[step].items()}
        quirky = {
            k.removeprefix("model."): v for k, v in fp32.items() if k not in ("lm_head.weight", "model.norm.weight")
        }
        quirky["layers.0.self_attn.rotary_extra.weight"] = torch.ones(3, 3)
        write_folder(root / "quirks" / f"checkpoint-{step}", quirky, config_dict)
        tied = {**fp32, "lm_head.weight": fp32["model.embed_tokens.weight"].clone()}
        del tied["model.norm.weight"]
        quirks_ref.append(write_folder(root / "quirks-ref" / f"step{step}", tied, config_dict))
    lora, merged = lora_checkpoints(root, base)
    return {
        "root": root, "base": base, "snapshot": snapshot, "plain": plain, "lora": lora, "merged": merged,
        "quirks_ref": quirks_ref, "base_state": base_state,
    }  # fmt: skip


def lora_checkpoints(root: Path, base: Path) -> tuple[Path, list[Path]]:
    """PEFT adapters saved by peft (TRL layout), and each merged by peft in float64 (the reference)."""
    import peft

    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    merged = []
    for step in STEPS[:2]:
        torch.manual_seed(step)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft.get_peft_model(model, lora_config).save_pretrained(root / "lora" / f"checkpoint-{step}")
        model64 = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
        model64 = peft.PeftModel.from_pretrained(model64, root / "lora" / f"checkpoint-{step}").merge_and_unload()
        state = {k: v.detach().clone() for k, v in model64.state_dict().items()}
        merged.append(write_folder(root / "merged" / f"step{step}", state, json.loads(model64.config.to_json_string())))
    return root / "lora", merged


@pytest.fixture(scope="module")
def page(study):
    """One diagnose call over every layout (base given as a hub id in the HF cache)."""
    root = study["root"]
    out = root / "out"
    runs = [
        f"trl={root / 'trl'}", f"verl={root / 'verl'}", "plain=" + ",".join(map(str, study["plain"])),
        f"quirks={root / 'quirks'}", "quirks-ref=" + ",".join(map(str, study["quirks_ref"])),
        f"lora={study['lora']}", "merged=" + ",".join(map(str, study["merged"])),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = diagnose("tiny-org/tiny-base", *runs, "--out", out, cache=root / "cache", hub=root / "hub")
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "stderr": proc.stderr, "seconds": seconds}


def table(out: Path, kind: str, run: str) -> pl.DataFrame:
    return pl.read_parquet(out / "tables" / f"{kind}-{run}.parquet").drop("run")


def test_layouts_are_detected_and_named(study):
    root = study["root"]
    assert [(c.step, c.adapter) for c in detect_run(str(root / "trl")).checkpoints] == [(s, False) for s in STEPS]
    assert detect_run(str(root / "trl")).layout == "trl"
    verl = detect_run(str(root / "verl"))
    assert verl.layout == "verl" and verl.checkpoints[0].path == root / "verl/global_step_10/actor/huggingface"
    assert detect_run(str(study["lora"])).layout == "trl+peft"
    assert detect_run(str(study["lora"] / "checkpoint-10")).layout == "peft"
    listed = detect_run("x=" + ",".join(map(str, study["plain"])))
    assert (listed.name, listed.layout, [c.step for c in listed.checkpoints]) == ("x", "hf-list", STEPS)


def test_every_layout_gives_the_tables_of_plain_folders(study, page):
    out = page["out"]
    summary = json.loads((out / "inputs.json").read_text())
    assert summary["base"]["resolved"].startswith("hub tiny-org/tiny-base (local HF cache")
    assert {r["name"]: r["layout"] for r in summary["runs"]} == {
        "trl": "trl", "verl": "verl", "plain": "hf-list", "quirks": "trl", "quirks-ref": "hf-list",
        "lora": "trl+peft", "merged": "hf-list",
    }  # fmt: skip
    # the reference: the geometry engine on the plain folders directly
    direct = compare_checkpoints(study["base"], study["plain"][-1], k=K)
    direct_traj = trajectory_table({0: study["base"], **dict(zip(STEPS, study["plain"]))}, K=K)
    for run in ("trl", "verl", "plain"):
        assert_frame_equal(table(out, "compare", run).drop("step"), direct)
        assert_frame_equal(table(out, "trajectory", run), direct_traj)
    assert table(out, "compare", "trl")["step"].unique().to_list() == [30]
    assert direct.filter(pl.col("metric") == "spectral_shift")["value"].min() > 0  # the update is visible


def test_renames_ties_dtypes_missing_and_extra_are_handled_and_reported(page):
    out, log = page["out"], page["stderr"]
    assert re.search(r"\d+/\d+ \[\d+:\d+<\d+:\d+", log)  # the progress bar, with its ETA, on stderr
    assert_frame_equal(table(out, "compare", "quirks"), table(out, "compare", "quirks-ref"))
    assert_frame_equal(table(out, "trajectory", "quirks"), table(out, "trajectory", "quirks-ref"))
    assert "23 tensors renamed onto the base's names (e.g. embed_tokens.weight -> model.embed_tokens.weight)" in log
    assert "no lm_head.weight (tied word embeddings): its lm_head is embed_tokens.weight" in log
    assert "are F32 against a BF16 base" in log
    assert "not diagnosed (absent elsewhere): layers.0.self_attn.rotary_extra.weight" in log
    assert "not diagnosed (absent elsewhere): model.norm.weight" in log
    names = table(out, "compare", "quirks")["tensor"].to_list()
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" not in names


def test_lora_matches_the_merged_float64_model(study, page):
    out = page["out"]
    assert "LoRA adapter: 6 matrices updated by scale * B @ A (rank 4, scale 2)" in page["stderr"]
    for kind in ("compare", "trajectory"):
        lora, merged = table(out, kind, "lora"), table(out, kind, "merged")
        assert_frame_equal(lora, merged, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)
    # and the update really is scale * B @ A: the Frobenius norm of one adapted matrix, by hand in float64
    from safetensors.torch import load_file

    adapter = load_file(str(study["lora"] / "checkpoint-20" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    delta = (adapter[f"{prefix}.lora_B.weight"].double() @ adapter[f"{prefix}.lora_A.weight"].double()) * (8 / 4)
    rows = table(out, "trajectory", "lora").filter(
        pl.col("step") == 20,
        pl.col("tensor") == "model.layers.1.self_attn.q_proj.weight",
        pl.col("metric") == "frobenius_norm",
    )
    assert rows["value"].item() == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-12)


def test_second_call_with_one_more_checkpoint_costs_that_checkpoint(study, tmp_path):
    root = study["root"]
    run = tmp_path / "run"
    for step in STEPS[:2]:
        shutil.copytree(root / "trl" / f"checkpoint-{step}", run / f"checkpoint-{step}")
    cache = tmp_path / "cache"
    first_s = time.perf_counter()
    assert diagnose(study["base"], run, "--out", tmp_path / "a", cache=cache).returncode == 0
    first_s = time.perf_counter() - first_s
    shutil.copytree(root / "trl" / "checkpoint-30", run / "checkpoint-30")
    second_s = time.perf_counter()
    proc = diagnose(study["base"], run, "--out", tmp_path / "b", cache=cache)
    second_s = time.perf_counter() - second_s
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((tmp_path / "a" / "inputs.json").read_text())["cache"]
    second = json.loads((tmp_path / "b" / "inputs.json").read_text())["cache"]
    matrices = 2 * 7  # layers x (q, k, v, o, gate, up, down)
    # first: W0 spectra + W0 masks + spectra of step 20 + dW spectra of steps 10 and 20
    assert first == {"computed": 5 * matrices, "reused": 0}
    # second: the spectrum of step 30 and its dW spectrum; W0's spectra and masks, dW of 10 and 20 are reused
    assert second == {"computed": 2 * matrices, "reused": 4 * matrices}
    print(f"\nfirst call {first_s:.2f} s ({first}), second call {second_s:.2f} s ({second})")


def test_meaningless_comparisons_fail_by_name_and_write_nothing(study, tmp_path):
    state = {k: v for k, v in study["base_state"].items()}
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32, dtype=torch.bfloat16)
    config = json.loads((study["base"] / "config.json").read_text())
    bad = write_folder(tmp_path / "bad" / "checkpoint-5", state, config)
    proc = diagnose(study["base"], bad.parent, "--out", tmp_path / "out", cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert "tensor model.layers.1.mlp.up_proj.weight: shape [64, 32]" in proc.stderr and "meaningless" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    other = write_folder(tmp_path / "llama" / "checkpoint-5", study["base_state"], {**config, "model_type": "llama"})
    proc = diagnose(study["base"], other.parent, "--out", tmp_path / "out", cache=tmp_path / "cache")
    assert proc.returncode == 1 and "different architecture: model_type = 'qwen3'" in proc.stderr
    proc = diagnose("tiny-org/not-cached", bad.parent, "--out", tmp_path / "out", cache=tmp_path / "c", hub=tmp_path)
    assert (
        proc.returncode == 1
        and "not in the local Hugging Face cache" in proc.stderr
        and "--allow-download" in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"capture_output": True, "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
        subprocess.run(["apt-get", "update"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], **quiet)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and cannot be installed (needs root and apt-get)")
    return found


CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
    width: i.naturalWidth, shown: i.getBoundingClientRect().height}));
  const tables = [...document.querySelectorAll('table.data')].map(t => ({id: t.id,
    rows: t.tBodies[0].rows.length, shown: t.getBoundingClientRect().height}));
  const out = document.createElement('pre'); out.id = 'render-check';
  out.textContent = JSON.stringify({images, tables}); document.body.appendChild(out);
});
</script>"""


def test_page_renders_every_figure_and_table_in_chromium(page, tmp_path):
    browser = chromium()
    index = page["out"] / "index.html"
    text = index.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text  # nothing to fetch
    probe = page["out"] / "render-check.html"  # beside index.html, so relative links behave the same
    probe.write_text(text.replace("</body>", CHECK + "</body>"))
    flags = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
    ]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    start = dom.stdout.index('<pre id="render-check">') + len('<pre id="render-check">')
    check = json.loads(dom.stdout[start : dom.stdout.index("</pre>", start)].replace("&quot;", '"'))
    figures = {i["alt"] for i in check["images"]}
    assert figures == {"rotation", "drift", "localization", "heatmap", "fig4a", "fig4b", "fig4c", "fig5"}
    assert all(i["ok"] and i["width"] > 100 and i["shown"] > 50 for i in check["images"]), check["images"]
    tables = {t["id"]: t for t in check["tables"]}
    assert {"runs", "table1", "compare-trl", "trajectory-lora"} <= set(tables)
    assert all(t["rows"] > 0 and t["shown"] > 0 for t in check["tables"]), check["tables"]
    assert tables["table1"]["rows"] == 7 and tables["trajectory-trl"]["rows"] == len(STEPS)
    shot = tmp_path / "diagnose.png"
    subprocess.run(
        [*flags, "--window-size=1200,1800", f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120
    )
    assert shot.stat().st_size > 10_000
    docs = REPO / "docs" / "diagnose.png"
    if os.environ.get("OPDGEOM_UPDATE_DOCS") or not docs.exists():
        shutil.copy(shot, docs)
