"""ONNX Runtime backend: runs the graphs written by `sd35trt export` (CPU here; CUDA where
onnxruntime-gpu is installed) through the same loop as every other backend."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..components import RUNTIME, component
from ..config import VariantConfig
from ..errors import BackendError, CheckpointError, InvalidInputError, OutOfMemoryError
from ..manifest import ExportManifest
from .base import BackendBase, ComponentCall

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64}
# How ONNX Runtime words an allocation failure (CPU arena, CUDA allocator, std::bad_alloc); its
# Python errors carry no type for it.
_OOM_MARKERS = ("failed to allocate memory", "available memory of", "out of memory", "bad_alloc", "alloc_failed")


class _Session:
    """One component: torch tensors in, torch tensors out (on the CPU)."""

    def __init__(self, path: Path, name: str, providers: Sequence, options) -> None:
        import onnxruntime as ort

        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({exc}); re-run `sd35trt export`") from exc
        spec = component(name)
        names_in, names_out = spec.input_names, spec.output_names
        got_in = tuple(i.name for i in self.session.get_inputs())
        if got_in != names_in:
            raise CheckpointError(f"{path}: inputs {got_in}, expected {names_in}; re-run `sd35trt export`")
        self.inputs = [(i.name, _NP[i.type]) for i in self.session.get_inputs()]
        self.outputs = list(names_out)

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: a.detach().cpu().numpy().astype(dtype, copy=False) for (name, dtype), a in zip(self.inputs, args)}
        try:
            outputs = self.session.run(self.outputs, feed)
        except Exception as exc:  # onnxruntime's errors are untyped: classify them once, here
            raise _run_error(self.path, feed, exc) from exc
        return [torch.from_numpy(o) for o in outputs]


def _run_error(path: Path, feed: Mapping[str, np.ndarray], exc: Exception) -> BackendError:
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
    text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    if any(m in str(exc).lower() for m in _OOM_MARKERS):
        return OutOfMemoryError(f"{path.name}: out of memory on inputs {shapes} ({text}); lower the image size "
                                f"or the batch, or give ONNX Runtime more memory")
    return BackendError(f"{path.name}: ONNX Runtime failed on inputs {shapes} ({text}); check {path} with "
                        f"`sd35trt export` (re-export) or the torch backend")


class OrtBackend(BackendBase):
    """Loads `<dir>/manifest.json` and one session per component listed there."""

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        config: VariantConfig,
        providers: Sequence | None = None,
        load_t5: bool = True,
        intra_op_threads: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        """`session_config`: ONNX Runtime session config entries (key -> value), e.g.
        {"session.use_env_allocators": "1"} to draw memory from an allocator the host process
        registered (with its own limit)."""
        import onnxruntime as ort

        if dtype is not None and dtype not in (torch.float32, "fp32"):
            raise InvalidInputError(f"dtype={dtype!r} does not apply to ONNX Runtime: the precision is fixed at "
                                    f"export (`sd35trt export --dtype`); drop dtype=")
        manifest = path.manifest if isinstance(getattr(path, "manifest", None), ExportManifest) else ExportManifest.load(path)
        self.device = torch.device("cpu")  # tensors cross to numpy; IO binding on CUDA is future work
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        providers = providers or ["CPUExecutionProvider"]
        for c in RUNTIME:
            entry = manifest.components.get(c.name)
            if entry is None and not c.optional:
                raise CheckpointError(f"{path}/manifest.json lists no {c.name}; re-run `sd35trt export`")
            wanted = entry is not None and (c.name != "t5" or load_t5)
            session = _Session(Path(path) / entry.file, c.name, providers, options) if wanted else None
            setattr(self, c.name, ComponentCall(session, c.name, session) if session else None)

    def close(self) -> None:
        for c in RUNTIME:
            setattr(self, c.name, None)
