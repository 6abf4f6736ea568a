"""`--lora NAME_OR_FILE[:SCALE]` of `generate` and `export` (checked before torch is imported).

A value is a .safetensors file, or (generate, with --lora-dir) the stem of one in that folder,
optionally followed by `:SCALE` (default 1.0), e.g. `--lora style.safetensors:0.7 --lora detail`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from .cli_checks import UsageError

MAX_SCALE = 8.0  # the runtime's limit (runtime/lora.py)


@dataclass(frozen=True)
class LoraArg:
    source: str  # a file path or a name in --lora-dir
    scale: float = 1.0


def lora_arg(text: str) -> LoraArg:
    """argparse type: 'FILE_OR_NAME[:SCALE]' (the last ':' starts the scale only if it parses as one)."""
    head, sep, tail = text.rpartition(":")
    source, scale = (head, tail) if sep and head else (text, "1")
    try:
        value = float(scale)
    except ValueError:
        source, value = text, 1.0  # a ':' that is part of the path
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"{text!r}: the scale after ':' must be a finite number in "
                                         f"[-{MAX_SCALE:g}, {MAX_SCALE:g}]")
    if not source:
        raise argparse.ArgumentTypeError(f"{text!r}: give a .safetensors file or a LoRA name, e.g. style.safetensors:0.8")
    return LoraArg(source, value)


def resolve(args: list[LoraArg], lora_dir: Path | None, flag: str = "--lora") -> list[tuple[Path, float]]:
    """(file, scale) of each --lora: a file as given, or `<lora_dir>/<name>.safetensors`."""
    out = []
    for a in args:
        path = Path(a.source)
        if not path.is_file() and lora_dir is not None and "/" not in a.source:
            path = Path(lora_dir) / f"{a.source}.safetensors"
        if not path.is_file():
            where = f" or a name in --lora-dir {lora_dir}" if lora_dir is not None else " (or pass --lora-dir DIR)"
            raise UsageError(f"{flag} {a.source}: no such LoRA file{where}")
        if path.suffix != ".safetensors":
            raise UsageError(f"{flag} {path}: only .safetensors LoRAs are loaded")
        out.append((path, a.scale))
    return out
