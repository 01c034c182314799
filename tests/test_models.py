"""Model folders: build, save/load round trip, and the hub path failing fast offline."""

import subprocess
import sys

import torch

from opdgeom.models import build_model, load_model, save_model
from opdgeom.tokenizer import build_char_tokenizer

SPEC = {
    "source": "build", "architecture": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32,
}  # fmt: skip


def test_save_writes_bf16_and_load_gives_fp32_master_weights(tmp_path):
    tok = build_char_tokenizer()
    model = build_model(SPEC, tok, seed=0)
    save_model(model, tok, tmp_path / "m")
    assert not list(tmp_path.glob(".m.tmp-*")), "temporary folder left behind"
    loaded = load_model(tmp_path / "m")
    for name, param in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], param.to(torch.bfloat16).float()), name
    assert all(p.dtype == torch.float32 for p in model.parameters()), "saving changed the caller's weights"


def test_hub_download_fails_fast_offline_with_what_to_prefetch(tmp_path):
    spec = '{"source": "hub", "repo": "Qwen/Qwen3-8B-Base", "revision": "49e3418fbbbca6ecbdf9608b4d22e5a407081db4"}'
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "opdgeom", "model", "--spec", spec, "--out", str(tmp_path / "student")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "hf download Qwen/Qwen3-8B-Base --revision 49e3418" in proc.stderr
    assert "HF_HOME" in proc.stderr
    assert not (tmp_path / "student").exists()
