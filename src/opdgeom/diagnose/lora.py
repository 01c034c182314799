"""PEFT LoRA adapters as checkpoint sources over the base: W+ = W0 + scale * B @ A, one tensor at a time.

scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; alpha_pattern per module), r the rank of
each module's A. Linear layers: delta = B @ A (transposed with fan_in_fan_out); embeddings
(lora_embedding_A/B): delta = (B @ A)^T. The sum is formed in float64 for the tensor being diagnosed
only, never as a merged model; modules_to_save tensors replace the base's. DoRA and LoRA biases
change more than B @ A and are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from opdgeom.diagnose.align import ADAPTER_WEIGHTS, canonical
from opdgeom.geometry.stream import TensorEntry, _read_header, load_tensor

FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
WRAPPERS = (".modules_to_save", ".original_module")


@dataclass(frozen=True)
class Factors:
    a: TensorEntry
    b: TensorEntry
    scale: float
    embedding: bool
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float64, in the base weight's orientation."""
        a64, b64 = load_tensor(self.a).to(torch.float64), load_tensor(self.b).to(torch.float64)
        delta = b64 @ a64
        if self.embedding or self.fan_in_fan_out:
            delta = delta.T
        return delta * self.scale


def read_adapter(folder: Path) -> tuple[dict, dict[str, TensorEntry]]:
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path}: unreadable adapter config ({exc})") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}: only LoRA adapters are supported")
    if config.get("use_dora"):
        raise ValueError(f"{config_path}: DoRA adapters (use_dora) are not supported: the update is not B @ A")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read; save safetensors)")
    return config, _read_header(weights)


def _alpha(config: dict, module: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return float(alpha)
    return float(config.get("lora_alpha", config.get("r", 8)))


def lora_source(
    folder: Path, base_keys: dict[str, TensorEntry], notes: list[str]
) -> tuple[str, dict[str, TensorEntry], object]:
    """(label, canonical key -> entry, loader) of base + adapter, as Aligner.align takes them.

    Adapted tensors get dtype F64 and the adapter file as their path; the rest are the base's.
    What the adapter changes is appended to ``notes``.
    """
    folder = Path(folder)
    config, entries = read_adapter(folder)
    pieces: dict[str, dict[str, TensorEntry]] = {}
    replaced: dict[str, TensorEntry] = {}
    for name, entry in entries.items():
        match = FACTOR.match(name)
        if match:
            pieces.setdefault(match["module"], {})[match["factor"].replace("embedding_", "")] = entry
        elif "lora_" in name:
            raise ValueError(f"{entry.path}: tensor {name}: unsupported LoRA tensor (only lora_A / lora_B)")
        else:
            clean = name
            for wrapper in WRAPPERS:
                clean = clean.replace(wrapper, "")
            replaced[canonical(re.sub(r"\.default(?=\.)", "", clean))] = entry
    keys = dict(base_keys)
    adapted: dict[str, Factors] = {}
    for module, parts in pieces.items():
        key = canonical(f"{module}.weight")
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: module {module} lacks lora_A or lora_B")
        if key not in base_keys:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: module {module} adapts {key}, which the base does not have")
        a, b = parts["lora_A"], parts["lora_B"]
        rank = a.shape[0]
        scale = _alpha(config, module) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        embedding = "lora_embedding_A" in a.name
        factors = Factors(a, b, scale, embedding, bool(config.get("fan_in_fan_out")) and not embedding)
        base = base_keys[key]
        shape = (b.shape[0], a.shape[1])
        shape = shape[::-1] if embedding or factors.fan_in_fan_out else shape
        if tuple(shape) != tuple(base.shape):
            raise ValueError(
                f"tensor {base.name}: B @ A of {module} in {b.path} is {list(shape)}, base is {list(base.shape)}"
            )
        keys[key] = TensorEntry(name=base.name, path=b.path, dtype="F64", shape=tuple(base.shape))
        adapted[base.name] = factors
    for key, entry in replaced.items():
        if key not in base_keys:
            raise ValueError(f"{entry.path}: tensor {entry.name} replaces {key}, which the base does not have")
        keys[key] = entry
    if not adapted and not replaced:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: the adapter holds no LoRA tensors")
    base_by_name = {e.name: e for e in base_keys.values()}
    ranks = sorted({f.a.shape[0] for f in adapted.values()})
    scales = sorted({round(f.scale, 6) for f in adapted.values()})
    notes.append(
        f"{folder}: LoRA adapter: {len(adapted)} matrices updated by scale * B @ A "
        f"(rank {', '.join(map(str, ranks))}, scale {', '.join(f'{s:g}' for s in scales)})"
        + (f"; {len(replaced)} tensors replaced (modules_to_save)" if replaced else "")
    )

    def load(entry: TensorEntry) -> torch.Tensor:
        factors = adapted.get(entry.name)
        if factors is None or entry.path != factors.b.path:  # a base tensor, or a modules_to_save one
            return load_tensor(entry)
        return load_tensor(base_by_name[entry.name]).to(torch.float64) + factors.delta()

    return str(folder), keys, load
