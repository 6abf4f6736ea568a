"""LoRAs in the server: loaded only from the folder given at start (`serve --lora-dir DIR`).

Every `*.safetensors` in the folder is loaded unfused when the model loads, under its file stem as
name (the pipeline gets one LoRA slot per file). A request picks LoRAs by name and strength,
`"loras": [{"name": "style", "scale": 0.7}]`; a request can never name a path. `GET /v1/loras`
lists them. Refusals are 400s with `param: "loras"`: an unknown name (or anything path-like), more
than `max_count` LoRAs, a repeated name, a scale outside [min_scale, max_scale].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.batching import Job
from ..runtime.errors import InvalidInputError
from .fields import FieldError


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="a LoRA listed by GET /v1/loras (the file stem in --lora-dir)")
    scale: float = Field(1.0, allow_inf_nan=False, description="strength")


@dataclass(frozen=True)
class LoraLimits:
    max_count: int = 4  # LoRAs per request
    min_scale: float = -2.0
    max_scale: float = 2.0

    def __post_init__(self) -> None:
        if not (type(self.max_count) is int and self.max_count >= 1) or not self.min_scale < self.max_scale:
            raise InvalidInputError(f"LoRA limits {self}: max_count must be an int >= 1 and min_scale < max_scale")


def lora_files(folder: Path) -> list[Path]:
    """The LoRA files of `--lora-dir` (InvalidInputError when it is not a folder)."""
    if not Path(folder).is_dir():
        raise InvalidInputError(f"--lora-dir {folder} is not a folder; pass the folder holding the *.safetensors LoRAs")
    return sorted(Path(folder).glob("*.safetensors"))


def load_lora_dir(pipe: Any, folder: Path) -> list[str]:
    """Load every LoRA of `folder` into `pipe` (unfused; slots and max rank sized to fit)."""
    from ..runtime.lora_files import read_lora

    files = [f for f in lora_files(folder) if f.stem not in pipe.loras]
    if files and not pipe.loras:
        ranks = [read_lora(f, pipe.config.transformer.num_layers).rank for f in files]
        pipe.lora_slots = max(pipe.lora_slots, len(files))
        pipe.lora_max_rank = max(pipe.lora_max_rank, -(-max(ranks) // 16) * 16)
    return [pipe.load_lora(f, name=f.stem) for f in files]


def check_loras(refs: Sequence[LoraRef] | None, available: Sequence[str], limits: LoraLimits) -> tuple:
    """The request's ((name, scale), ...), or FieldError('loras', ...) naming the first bad entry."""
    if not refs:
        return ()
    if len(refs) > limits.max_count:
        raise FieldError("loras", f"{len(refs)} LoRAs exceed the limit of {limits.max_count} per request")
    seen: list[str] = []
    for i, ref in enumerate(refs):
        if "/" in ref.name or "\\" in ref.name or ref.name.endswith(".safetensors"):
            raise FieldError("loras", f"[{i}].name {ref.name!r} looks like a path; requests name LoRAs loaded at "
                                      f"start (GET /v1/loras): {list(available)}")
        if ref.name not in available:
            raise FieldError("loras", f"[{i}].name {ref.name!r} is not loaded; available (GET /v1/loras): "
                                      f"{list(available)}")
        if ref.name in seen:
            raise FieldError("loras", f"[{i}].name {ref.name!r} appears twice; give each LoRA once")
        if not limits.min_scale <= ref.scale <= limits.max_scale:
            raise FieldError("loras", f"[{i}].scale {ref.scale} is outside [{limits.min_scale}, {limits.max_scale}]")
        seen.append(ref.name)
    return tuple((r.name, float(r.scale)) for r in refs)


def with_loras(job: Job, refs: Sequence[LoraRef] | None, available: Sequence[str], limits: LoraLimits) -> Job:
    loras = check_loras(refs, available, limits)
    return replace(job, loras=loras) if loras else job


def describe(pipe: Any) -> dict[str, Any]:
    """GET /v1/loras: {"object": "list", "data": [{"id": name, "object": "lora", "rank": …, …}]}."""
    data = [{"id": x["name"], "object": "lora", **{k: v for k, v in x.items() if k != "name"}}
            for x in (pipe.lora_info() if pipe is not None else [])]
    return {"object": "list", "data": data}
