"""ONNX Runtime backend: runs the graphs written by `sd35trt export` (CPU here; CUDA where
onnxruntime-gpu is installed) through the same loop as every other backend.

Integrity: every graph and external-data file is checked against the sha256 its export manifest
records, so a corrupted, truncated or swapped file is refused (`CheckpointError` naming the file and
the `sd35trt export` command that remakes it) instead of silently giving other images. A file is
hashed in full the first time it is seen (the export records its own hashes, so that is the first
load of a copied folder) on a small thread pool while ONNX Runtime creates the sessions from the
same files (hashlib and ONNX Runtime release the GIL); after that, the manifest's `HashCache` stamp
(size, mtime, ctime, inode: any write or replacement changes it) stands for the hash. Measured with
a 1 GiB graph on this project's 2-core CPU machine (README "Serving"): sessions 1.5 s; stamp
checks +0%; a full hash alongside costs nothing with a core to spare and up to +85% with none
(sha256 runs at ~0.85 GB/s per core). `verify="full"` hashes every file on every load,
`verify=False` skips the check.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..components import RUNTIME, Component, component, graph_component
from ..config import VariantConfig
from ..control_graph import ControlNetRecord, check_fits, check_same
from ..errors import BackendError, CheckpointError, InvalidInputError, OutOfMemoryError
from ..manifest import ExportEntry, ExportManifest, HashCache, hash_stamped
from .base import BackendBase, ComponentCall, graph_layers, zero_residuals

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64}
# How ONNX Runtime words an allocation failure (CPU arena, CUDA allocator, std::bad_alloc); its
# Python errors carry no type for it.
_OOM_MARKERS = ("failed to allocate memory", "available memory of", "out of memory", "bad_alloc", "alloc_failed")


class _Session:
    """One component: torch tensors in, torch tensors out (on the CPU)."""

    def __init__(self, path: Path, name: str, providers: Sequence, options, fix: str, spec: Component | None = None) -> None:
        import onnxruntime as ort

        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({text}); {fix}") from exc
        spec = spec or component(name)
        names_in, names_out = spec.input_names, spec.output_names
        got_in = tuple(i.name for i in self.session.get_inputs())
        if got_in != names_in:
            raise CheckpointError(f"{path}: inputs {got_in}, expected {names_in}; {fix}")
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


VERIFY = (True, "full", False)  # hashes reused while a file is unchanged | hash every load | no check


def open_verified(folder: Path, entries: Mapping[str, ExportEntry], open_one: Callable[[str, ExportEntry], object],
                  fix: str, verify: bool | str = True) -> tuple[dict[str, object], dict[str, list[str]]]:
    """`open_one(component, entry)` for every entry (in order) while the files not hashed since they
    last changed are hashed on a thread pool; then every entry is checked against its recorded
    sha256 (CheckpointError naming the file and `fix`). A session that fails to open is reported as
    the hash mismatch when its file is the one that changed. Returns (opened, {"hashed": [...],
    "unchanged": [...]}), the files hashed now and those whose stamp vouched for their hash."""
    if verify not in VERIFY:
        raise InvalidInputError(f"verify={verify!r}: use True (hash files once, then trust their unchanged "
                                f"stamp), 'full' (hash on every load) or False (no check)")
    names = sorted({n for e in entries.values() for n, _ in e.hashed_files() if (folder / n).is_file()})
    if verify is False or not names:
        return {c: open_one(c, e) for c, e in entries.items()}, {"hashed": [], "unchanged": []}
    cache = HashCache(folder)
    known = {n: d for n in names if verify is True and (d := cache.get(n)) is not None}
    todo = [n for n in names if n not in known]
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(todo), (os.cpu_count() or 2) - 1, 4)),
                              thread_name_prefix="sd35trt-verify")
    hashing: dict[str, Future] = {n: pool.submit(hash_stamped, folder / n) for n in todo}

    def check(entry: ExportEntry) -> None:
        mine = dict(entry.hashed_files())
        digests = {**{n: d for n, d in known.items() if n in mine},
                   **{n: f.result()[0] for n, f in hashing.items() if n in mine}}
        entry.content_digest(folder, fix, digests)

    try:
        opened = {}
        for comp, entry in entries.items():
            try:
                opened[comp] = open_one(comp, entry)
            except CheckpointError:
                check(entry)  # a changed file explains the failure better than ONNX Runtime does
                raise
        for entry in entries.values():
            check(entry)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for n, f in hashing.items():  # all matched the manifest: remember them while the files stay as they are
        digest, file_stamp = f.result()
        if file_stamp is not None:
            cache.put(n, digest, file_stamp)
    if todo:
        cache.save()
    return opened, {"hashed": todo, "unchanged": sorted(known)}


class OrtBackend(BackendBase):
    """Loads `<dir>/manifest.json` and one session per component listed there, each checked
    against the manifest's content hashes (`verify`: see `open_verified`; `verification` says
    which files were hashed and which were vouched for by their unchanged stamp)."""

    name = "onnxruntime"
    skip_layers = True  # the exported transformer takes the per-block skip input
    controlnet = True  # exports made with `--controlnet` (runtime/control_graph.py); others refuse by name

    @classmethod
    def check_controlnet(cls, path: Any, config: VariantConfig, paths: Any) -> None:
        manifest = _manifest(path)
        check_fits(ControlNetRecord.from_dict(manifest.controlnet), paths, config.transformer, Path(path),
                   manifest.export_command(Path(path), _first(paths)))

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
        verify: bool | str = True,
    ) -> None:
        """`session_config`: ONNX Runtime session config entries (key -> value), e.g.
        {"session.use_env_allocators": "1"} to draw memory from an allocator the host process
        registered (with its own limit)."""
        import onnxruntime as ort

        if dtype is not None and dtype not in (torch.float32, "fp32"):
            raise InvalidInputError(f"dtype={dtype!r} does not apply to ONNX Runtime: the precision is fixed at "
                                    f"export (`sd35trt export --dtype`); drop dtype=")
        manifest = _manifest(path)
        self.device = torch.device("cpu")  # tensors cross to numpy; IO binding on CUDA is future work
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        providers = providers or ["CPUExecutionProvider"]
        folder = Path(path)
        fix = f"re-export it: {manifest.export_command(folder)}"
        wanted = {}
        for c in RUNTIME:
            entry = manifest.components.get(c.name)
            if entry is None and not c.optional:
                raise CheckpointError(f"{folder / 'manifest.json'} lists no {c.name} (an export that did not "
                                      f"finish?); {fix}")
            if entry is not None and (c.name != "t5" or load_t5):
                wanted[c.name] = entry
        record = ControlNetRecord.from_dict(manifest.controlnet)
        residuals = record.residuals if record else None
        self._open = lambda comp, e: _Session(folder / e.file, comp, providers, options, fix,
                                              graph_component(comp, residuals))
        sessions, self.verification = open_verified(folder, wanted, self._open, fix, verify)
        for c in RUNTIME:
            session = sessions.get(c.name)
            zeros = zero_residuals(residuals if c.name == "transformer" else None, config, broadcast=True)
            call = ComponentCall(session, c.name, session, graph_layers(c.name, config), zeros) if session else None
            setattr(self, c.name, call)
        self.folder, self.manifest, self.config, self._verify = folder, manifest, config, verify
        self._controlnet: ComponentCall | None = None

    def load_controlnet(self, net: Path) -> tuple[Any, Callable[..., torch.Tensor]]:
        """The export's ControlNet graph, for the ControlNet at `net` it was exported from (its
        content hash; the graph's own is checked like every other graph's)."""
        m, folder = self.manifest, self.folder
        spec = check_same(ControlNetRecord.from_dict(m.controlnet), net, self.config.transformer, folder,
                          m.export_command(folder, net), HashCache(folder))
        if self._controlnet is None:
            entry = m.components.get("controlnet")
            if entry is None:
                raise CheckpointError(f"{folder / 'manifest.json'} lists no controlnet graph (an export that did not "
                                      f"finish?); {m.export_command(folder)}")
            opened, _ = open_verified(folder, {"controlnet": entry}, self._open, m.export_command(folder), self._verify)
            self._controlnet = ComponentCall(opened["controlnet"], "controlnet", opened["controlnet"])
        return spec, self._controlnet

    def close(self) -> None:
        for c in RUNTIME:
            setattr(self, c.name, None)
        self._controlnet = None


def _manifest(path: Any) -> ExportManifest:
    return path.manifest if isinstance(getattr(path, "manifest", None), ExportManifest) else ExportManifest.load(path)


def _first(paths: Any) -> Any:
    return paths[0] if isinstance(paths, (list, tuple)) and paths else paths
