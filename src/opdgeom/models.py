"""Model families: build tiny models from transformers configs, download hub models, load and save
Hugging Face folders (safetensors + tokenizer) atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

ARCHITECTURES = {
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}
# Positions the tiny study ever needs (prompt + completion, or a pretraining window).
TINY_MAX_POSITIONS = 256

# Per-call "Loading weights" bars would flood the logs of jobs that load dozens of checkpoints.
transformers.utils.logging.disable_progress_bar()


def build_model(spec: dict, tokenizer, seed: int) -> transformers.PreTrainedModel:
    """A freshly initialised causal LM of the family's architecture and tiny dimensions (fp32)."""
    config_cls = ARCHITECTURES[spec["architecture"]]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=False,  # keep lm_head a separate matrix so it is diagnosed on its own
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an HF folder; training keeps fp32 master weights whatever the checkpoint dtype."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (config.json is missing)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def load_tokenizer(path: str | Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # hub tokenizers (Llama) may lack one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a temporary folder beside ``out_dir``; rename it into place only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, state_dict=None) -> Path:
    """Write an HF folder (safetensors in ``dtype``, config, tokenizer) atomically.

    Casting a copy of the state dict keeps the caller's fp32 master weights untouched;
    ``state_dict`` supplies the weights when the model itself is sharded (FSDP gathers them).
    """
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu", dtype) for k, v in source.items()}
    with atomic_dir(out_dir) as tmp:
        model.config.dtype = dtype
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def download_model(repo: str, revision: str, out_dir: str | Path) -> Path:
    """Fetch a pinned revision of a hub model (safetensors, config, tokenizer) into ``out_dir``.

    Fails fast offline with a message saying how to pre-fetch: set HF_HOME to a cache holding the
    revision, or point the family preset at a local folder.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
    try:
        with atomic_dir(out_dir) as tmp:
            snapshot_download(repo_id=repo, revision=revision, local_dir=tmp, allow_patterns=patterns)
            # Record the commit a branch name resolved to, so results say exactly which weights they used.
            (tmp / ".revision").write_text(HfApi().model_info(repo, revision=revision).sha + "\n")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise RuntimeError(
            f"could not download {repo}@{revision} into {out_dir}: {err}\n"
            f"Pre-fetch it on a machine with network access: "
            f"`huggingface-cli download {repo} --revision {revision}` with HF_HOME pointing at a shared "
            f"cache visible here (and HF_HUB_OFFLINE=1), or copy the folder to {out_dir}."
        ) from err
    return Path(out_dir)
