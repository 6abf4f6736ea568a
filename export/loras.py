"""`sd35trt export --lora FILE[:SCALE]`: LoRAs fused into the weights before calibration.

ModelOpt's advice for FP8 is to fuse first and calibrate the fused model, so a LoRA baked into an
export is `W + s·BA` (runtime/lora.py `fuse_lora`) in the MMDiT, CLIP-L and CLIP-G before the
calibration prompts run. The manifest records each LoRA as {file, sha256, scale}; the hashes and
scales enter the fingerprints of the calibration and of every component a LoRA patches, so a
changed file, scale or set makes those components stale (re-exported; engines built from the old
graphs are then refused by their ONNX hash).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ..runtime.errors import CheckpointError
from ..runtime.files import sha256_file
from ..runtime.lora import check_scale, fuse_lora, inner
from ..runtime.lora_files import COMPONENTS, read_lora


def lora_records(loras: Sequence[tuple[str | Path, float]]) -> list[dict[str, Any]]:
    """[{file, sha256, scale}] of `--lora` values (CheckpointError for a missing or non-safetensors file)."""
    out = []
    for path, scale in loras:
        path = Path(path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise CheckpointError(f"--lora {path}: not a .safetensors file; pass a LoRA file (FILE[:SCALE])")
        out.append({"file": str(path), "sha256": sha256_file(path), "scale": check_scale("--lora scale", scale)})
    return out


def fingerprint_part(records: Sequence[Mapping[str, Any]], component: str | None = None) -> list:
    """What of the LoRAs a fingerprint hashes: (sha256, scale) pairs (not paths), for the
    components LoRAs can patch (or for the calibration when `component` is None)."""
    if component is not None and component not in COMPONENTS:
        return []
    return [(r["sha256"], r["scale"]) for r in records]


def fuse_records(mods: Mapping[str, nn.Module], records: Sequence[Mapping[str, Any]], num_layers: int) -> int:
    """Fuse every recorded LoRA into the loaded modules (those not loaded are cached exports);
    refuses a file that changed since it was hashed. Returns the layers patched."""
    models = {c: inner(mods[c]) for c in COMPONENTS if c in mods}
    layers = 0
    for r in records:
        lora = read_lora(r["file"], num_layers)
        if lora.sha256 != r["sha256"]:
            raise CheckpointError(f"--lora {r['file']} changed while exporting; run the export again")
        parts = {c: p for c, p in lora.parts.items() if c in models}
        layers += fuse_lora(models, replace(lora, parts=parts), r["scale"])
    return layers
