"""The ControlNet of an export or engine set (`sd35trt export --controlnet PATH`): which ControlNet
its graphs were made from, and the checks ONNX Runtime and TensorRT make before running it.

An export made with a ControlNet differs from a plain one in two graphs: `controlnet.onnx`
(component `controlnet`) and a transformer graph with one more input, `controlnet_residuals`
[R, B, h*w/p^2, D] (`components.controlled_transformer`; R, the ControlNet's block count, is fixed
in the graph, D is the MMDiT's width). A plain export is unchanged, so text-to-image without a
ControlNet costs nothing extra; with a ControlNet export, a call without control images feeds zero
residuals (ONNX Runtime: a broadcast [R, 1, 1, D]; engines: the profile's full shape).

The manifests record the ControlNet as {source, sha256, residuals, spec}: `sha256` is the
content hash of its files (config.json + safetensors, or Stability's single file), so a
ControlNet that changed since export, or another one, is refused by name with the re-export.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import TransformerSpec
from .errors import CheckpointError, InvalidInputError
from .files import sha256_file
from .manifest import HashCache
from .models.controlnet import ControlNetSpec, read_spec
from .models.controlnet_file import single_file_spec


@dataclass(frozen=True)
class ControlNetRecord:
    source: str  # the ControlNet folder or file, resolved
    sha256: str  # content hash of its files (`fingerprint`)
    residuals: int  # R: the residuals its transformer graph takes (the ControlNet's block count)
    spec: Mapping[str, Any]  # ControlNetSpec.to_config()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> ControlNetRecord | None:
        if not doc:
            return None
        return cls(str(doc["source"]), str(doc["sha256"]), int(doc["residuals"]), dict(doc["spec"]))

    @property
    def net_spec(self) -> ControlNetSpec:
        return ControlNetSpec.from_config(dict(self.spec), self.source)


def files_of(path: Path) -> list[Path]:
    """The files that make a ControlNet: Stability's single file, or a folder's config + weights."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".json") and p.is_file())


def fingerprint(path: str | Path, hashes: HashCache | None = None) -> str:
    """Content hash of a ControlNet's files; `hashes` (an export folder's cache, keyed by absolute
    path) vouches for files unchanged since they were hashed."""
    parts = []
    for f in files_of(Path(path).resolve()):
        digest = hashes.get(str(f)) if hashes is not None else None
        if digest is None:
            digest = sha256_file(f)
            if hashes is not None:
                hashes.put(str(f), digest)
        parts.append(f"{f.name}:{digest}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_net_spec(path: str | Path, transformer: TransformerSpec) -> ControlNetSpec:
    """A ControlNet's architecture from its config.json or its single file's header (no weights read),
    checked against the MMDiT it adds residuals to."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        spec = single_file_spec(path, transformer)
    elif path.is_dir():
        spec = read_spec(path)
    else:
        raise CheckpointError(f"controlnet={str(path)!r} is neither a folder nor a .safetensors file; pass a "
                              f"diffusers ControlNet folder or Stability's .safetensors file")
    spec.check_transformer(transformer, path)
    return spec


def make_record(path: str | Path, transformer: TransformerSpec, hashes: HashCache | None = None) -> ControlNetRecord:
    """The manifest record of the ControlNet at `path` (`sd35trt export --controlnet PATH`)."""
    spec = read_net_spec(path, transformer)
    if spec.extra_conditioning_channels:
        raise InvalidInputError(f"--controlnet {path}: it takes {spec.extra_conditioning_channels} extra conditioning "
                                f"channel(s) (an inpainting ControlNet); only image ControlNets are supported")
    return ControlNetRecord(str(Path(path).resolve()), fingerprint(path, hashes), spec.num_layers, spec.to_config())


def check_fits(record: ControlNetRecord | None, paths: str | Path | Sequence[str | Path], transformer: TransformerSpec,
               where: Path, fix: str) -> None:
    """Cheap checks before a backend loads (config files only): the set has a ControlNet, and each
    requested one gives as many residuals, as wide, as its transformer graph takes."""
    items = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    if record is None:
        raise InvalidInputError(f"controlnet={paths!r}: {where} was exported without a ControlNet (its transformer "
                                f"takes no residuals); re-export with the ControlNet: {fix}")
    for p in items:
        spec = read_net_spec(p, transformer)  # CheckpointError for a width that does not fit
        if spec.num_layers != record.residuals:
            raise InvalidInputError(
                f"controlnet={str(p)!r} gives {spec.num_layers} residuals, but the transformer graph in {where} takes "
                f"{record.residuals} (exported for {record.source}); re-export with this ControlNet: {fix}")


def check_same(record: ControlNetRecord | None, path: str | Path, transformer: TransformerSpec, where: Path, fix: str,
               hashes: HashCache | None = None) -> ControlNetSpec:
    """The ControlNet at `path` is the one the set's graphs were made from (its content hash);
    returns its spec. `fix`: the command that re-exports the set with `path`."""
    check_fits(record, path, transformer, where, fix)
    got = fingerprint(path, hashes)
    if hashes is not None:
        hashes.save()  # the next load vouches for the unchanged files by their stamps
    if got != record.sha256:
        raise CheckpointError(
            f"controlnet={str(path)!r} is not the ControlNet {where} was exported with ({record.source}, sha256 "
            f"{record.sha256[:12]}…; this one {got[:12]}…): it changed since, or is another one; re-export: {fix}")
    return record.net_spec
