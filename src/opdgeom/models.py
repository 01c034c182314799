"""Model families: build tiny models from transformers configs, load and save
Hugging Face folders (safetensors + tokenizer) atomically."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from opdgeom.hf_folder import write_hf_folder

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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", spread: bool = False):
    """Load an HF folder; training keeps fp32 master weights whatever the checkpoint dtype.

    ``spread``: place the layers across every visible GPU (transformers' device_map="auto", which
    needs accelerate): a model too large for one GPU, run one layer after another (evaluation's
    teacher on a multi-GPU evaluate job)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (config.json is missing)")
    if spread:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def load_tokenizer(path: str | Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # hub tokenizers (Llama) may lack one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an HF folder (safetensors in ``dtype``, config, tokenizer) atomically; the caller's
    weights stay in their own dtype (opdgeom.hf_folder, the writer of every checkpoint too)."""
    return write_hf_folder(model, tokenizer, out_dir, dtype)
