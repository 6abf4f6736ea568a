"""TensorRT and TensorRT-RTX backends: run an engine set written by `sd35trt build`.

One class for both flavors (the manifest says which library built the set; the two runtime APIs
used here are the same). Before anything is deserialized, the manifest is checked against the
backend's flavor, the installed library version, every engine's sha256 and this GPU's compute
capability (`engine_manifest.preflight` runs the same checks as one function); each call checks its
input shapes against the engine's profile first. All of those checks are pure and tested in CI.

NEVER EXECUTED here: everything from `deserialize_cuda_engine` on (no enterprise TensorRT can be
installed, and TensorRT-RTX refuses to run on our only GPU, an sm90 H100/H200). It follows the
documented API listed beside `FLAVORS` in `export/trt_build.py`.

Execution: one execution context per component and per request slot (`slots=N` concurrent
callers); the contexts of a slot share one device-memory block (components of a slot never run at
the same time); inputs and outputs are preallocated CUDA tensors at the profile's max shapes, bound
once with `set_tensor_address`; a call copies its inputs in, sets the input shapes, enqueues
`execute_async_v3` on the current torch stream and copies the outputs out on that stream. A slot
carries an event, so the next user of the slot waits on the GPU, never on the host.
ControlNet: a set built from an `export --controlnet` folder holds the ControlNet's engine and a
transformer engine with the `controlnet_residuals` input (runtime/control_graph.py); calls without
control images copy zeros into that input. `check_controlnet` (before loading, no GPU) runs in CI.
Memory modes (`memory="balanced"|"low"`, runtime/memory.py) move the engines built with
`--weight-streaming` between a streaming budget of 0 and their own (`StreamedWeights`), recreating
their contexts, on the same stage plan as the torch backends; engines without it stay resident.
TODO(cuda-graphs): capture the transformer step of static engines (TensorRT-RTX also offers
IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE); not written yet.
"""

from __future__ import annotations

import importlib
import queue
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch

from ..components import RUNTIME, graph_component
from ..config import VariantConfig
from ..control_graph import ControlNetRecord, check_fits, check_same
from ..engine_manifest import (FLOAT_DTYPES, LIBRARIES, TRT_DTYPES, EngineManifest, EngineSetError, check_device,
                               check_engine_files, check_flavor, check_library, check_shapes, device_cc,
                               rebuild_command)
from ..errors import InvalidInputError
from ..manifest import HashCache
from .base import BackendBase, ComponentCall, Limits, graph_layers, zero_residuals


@dataclass(frozen=True)
class Binding:
    """One engine I/O tensor as the backend binds it."""

    name: str
    is_input: bool
    dtype: str  # "float32", "float16", "bfloat16", "int64"
    profile: tuple[tuple[int, ...], ...] | None  # inputs: (min, opt, max); outputs: None


def binding_table(name: str, m: EngineManifest) -> tuple[Binding, ...]:
    """What the backend binds for component `name` of an engine set: names and the dtype rule from
    the component table, the float dtype from the export precision, profiles from the variant
    config and the set's shapes."""
    spec, profiles = graph_component(name, m.residuals), m.profiles()[name]
    dtypes = spec.dtypes(FLOAT_DTYPES[m.dtype])
    return tuple(Binding(n, True, dtypes[n], tuple(profiles[n])) for n in spec.input_names) + tuple(
        Binding(n, False, dtypes[n], None) for n in spec.output_names)


def engine_limits(m: EngineManifest) -> Limits:
    return Limits(max_batch=m.shapes.batches[2], min_size=m.shapes.sizes[0], max_size=m.shapes.sizes[2])


class TrtBackend(BackendBase):
    """`Pipeline.from_pretrained(engine_dir)` (the set's flavor), or backend="tensorrt-rtx" / "tensorrt"."""

    flavor = ""  # set by the two flavor classes below
    skip_layers = True  # the transformer engine takes the per-block skip input
    controlnet = True  # sets built from an `export --controlnet` folder (runtime/control_graph.py)

    @classmethod
    def limits_for(cls, path: Any, config: VariantConfig) -> Limits:
        return engine_limits(EngineManifest.load(Path(path)))

    @classmethod
    def check_controlnet(cls, path: Any, config: VariantConfig, paths: Any) -> None:
        m = EngineManifest.load(Path(path))
        first = paths[0] if isinstance(paths, (list, tuple)) and paths else paths
        check_fits(ControlNetRecord.from_dict(m.controlnet), paths, config.transformer, Path(path),
                   controlnet_fix(m, Path(path), first))

    def __init__(self, path: Any, config: VariantConfig, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, load_t5: bool = True, slots: int = 1,
                 weight_streaming_budget: int | None = None) -> None:
        flavor = self.flavor
        self.name, self.path = flavor, Path(path)
        if dtype is not None:
            raise InvalidInputError(f"dtype={dtype} does not apply to {flavor}: engine precision is fixed at build")
        if not (type(slots) is int and slots >= 1):
            raise InvalidInputError(f"slots={slots!r} must be an int >= 1 (concurrent requests)")
        self.doc = EngineManifest.load(self.path)
        self.limits = engine_limits(self.doc)
        check_flavor(self.doc, self.path, flavor)
        lib = LIBRARIES[flavor]
        try:
            trt = importlib.import_module(lib.module)
        except ImportError as exc:
            raise EngineSetError(f"backend {flavor!r} needs {lib.module} ({exc}); {lib.install}") from exc
        check_library(self.doc, self.path, trt.__version__)  # these two need no GPU (run in CI)
        check_engine_files(self.doc, self.path)
        if not torch.cuda.is_available():
            raise EngineSetError(f"backend {flavor!r} needs a CUDA GPU and none is visible; on a CPU use "
                                 f"backend='onnxruntime' with an `sd35trt export` folder")
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise InvalidInputError(f"device={device!r}: {flavor} engines run on CUDA devices (cuda, cuda:N)")
        check_device(self.doc, self.path, device_cc(self.device))
        comps = [c for c in self.doc.components if c != "t5" or load_t5]
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives the engines
            self._engines = {c: self._deserialize(trt, self._runtime, c, weight_streaming_budget) for c in comps}
            self.budget, self.n_slots = weight_streaming_budget, slots
            self._slots: queue.Queue[_Slot] = queue.Queue()
            for _ in range(slots):
                self._slots.put(_Slot(trt, self._engines, self.device))
        variant = self.doc.variant
        for c in RUNTIME:
            run = partial(self.run, c.name)
            zeros = zero_residuals(self.doc.residuals if c.name == "transformer" else None, variant, broadcast=False)
            call = ComponentCall(run, c.name, graph_layers=graph_layers(c.name, variant), residuals=zeros)
            setattr(self, c.name, call if c.name in self._engines else None)

    def load_controlnet(self, net: Path) -> tuple[Any, Any]:
        """The set's ControlNet engine, for the ControlNet at `net` its export was made from."""
        spec = check_same(ControlNetRecord.from_dict(self.doc.controlnet), net, self.doc.variant.transformer,
                          self.path, controlnet_fix(self.doc, self.path, net), HashCache(self.path))
        if "controlnet" not in self._engines:  # check_engine_files refuses such a set; kept for clarity
            raise EngineSetError(f"{self.path} holds no controlnet engine; rebuild: {rebuild_command(self.doc, self.path)}")
        return spec, ComponentCall(partial(self.run, "controlnet"), "controlnet")

    def _deserialize(self, trt: Any, runtime: Any, comp: str, budget: int | None) -> tuple[Any, tuple[Binding, ...]]:
        path = self.path / self.doc.components[comp].file
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineSetError(f"{path} could not be deserialized by {self.name} {trt.__version__}; "
                                 f"rebuild: {rebuild_command(self.doc, self.path)}")
        table = binding_table(comp, self.doc)
        _check_engine_io(engine, trt, table, path, self.doc)
        if budget is not None:
            if not self.doc.components[comp].flags["weight_streaming"]:
                raise InvalidInputError(f"weight_streaming_budget: {path} was built without weight streaming; "
                                        f"rebuild: {rebuild_command(self.doc, self.path, weight_streaming=True)}")
            engine.weight_streaming_budget_v2 = budget
        return engine, table

    def check_request(self, batch: int, height: int, width: int, max_sequence_length: int = 256) -> None:
        """Refuse, before any component runs, a request that one of the engines cannot take."""
        for comp in self._engines:
            spec = graph_component(comp, self.doc.residuals)
            b = batch * 2 if self.doc.shapes.cfg and spec.cfg_doubled else batch
            check_shapes(self.doc, self.path, comp, spec.shapes(self.doc.variant, b, height, width, max_sequence_length))

    def run(self, component: str, *args: torch.Tensor) -> list[torch.Tensor]:
        _, table = self._engines[component]
        inputs = [b for b in table if b.is_input]
        shapes = {b.name: tuple(a.shape) for b, a in zip(inputs, args)}
        check_shapes(self.doc, self.path, component, shapes)  # before anything is enqueued
        slot = self._slots.get()
        try:
            return slot.run(component, inputs, args, shapes, torch.cuda.current_stream(self.device))
        finally:
            self._slots.put(slot)

    def weight_handles(self) -> dict:
        """Memory modes: the engines built with weight streaming, each moved between a streaming
        budget of 0 (only its non-streamable weights on the device) and its own budget."""
        return {c: StreamedWeights(self, c) for c, (e, _) in self._engines.items()
                if self.doc.components[c].flags.get("weight_streaming")}

    def close(self) -> None:
        self._slots = queue.Queue()
        self._engines, self._runtime = {}, None
        for c in RUNTIME:
            setattr(self, c.name, None)


def controlnet_fix(m: EngineManifest, folder: Path, net: Any) -> str:
    """How to get a set that runs the ControlNet at `net`: re-export with it, then rebuild."""
    return (f"re-export with it (`sd35trt export --model MODEL --out {m.build.onnx} --controlnet {net}`), then "
            f"rebuild: {rebuild_command(m, folder)}")


class _Slot:
    """Execution contexts of every engine for one concurrent request, one shared device-memory
    block, and preallocated I/O tensors at the profiles' max shapes."""

    def __init__(self, trt: Any, engines: Mapping[str, tuple[Any, tuple[Binding, ...]]], device: torch.device) -> None:
        size = max([256] + [e.device_memory_size_v2 for e, _ in engines.values()])
        self.memory = torch.empty(size, dtype=torch.uint8, device=device)  # [bytes], 256-byte aligned
        self.ready: torch.cuda.Event | None = None
        self.trt, self.device = trt, device
        self.contexts, self.buffers = {}, {}
        for comp, (engine, table) in engines.items():
            self.make_context(comp, engine, table)

    def make_context(self, comp: str, engine: Any, table: tuple[Binding, ...]) -> None:
        """(Re)create the execution context of `comp` (after a weight-streaming budget change too)."""
        self.contexts.pop(comp, None)
        ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        ctx.set_device_memory(self.memory.data_ptr(), engine.device_memory_size_v2)
        bufs = {}
        for b in table:  # inputs first (component-table order), so output max shapes resolve
            if b.is_input:
                ctx.set_input_shape(b.name, b.profile[2])
            shape = tuple(ctx.get_tensor_shape(b.name))  # max input shape / its output shape
            bufs[b.name] = torch.empty(shape, dtype=getattr(torch, b.dtype), device=self.device)
            ctx.set_tensor_address(b.name, bufs[b.name].data_ptr())
        self.contexts[comp], self.buffers[comp] = ctx, bufs

    def run(self, comp: str, inputs: list[Binding], args: tuple[torch.Tensor, ...],
            shapes: Mapping[str, tuple[int, ...]], stream: torch.cuda.Stream) -> list[torch.Tensor]:
        ctx, bufs = self.contexts[comp], self.buffers[comp]
        if self.ready is not None:
            stream.wait_event(self.ready)  # the slot's previous user, on the GPU: no host sync
        for b, a in zip(inputs, args):
            _view(bufs[b.name], shapes[b.name]).copy_(a, non_blocking=True)  # casts to the engine dtype
            ctx.set_input_shape(b.name, shapes[b.name])
        outs = [_view(bufs[n], tuple(ctx.get_tensor_shape(n))) for n in bufs if n not in shapes]
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineSetError(f"{comp}: execute_async_v3 failed for input shapes {dict(shapes)}")
        results = [o.clone() for o in outs]  # on `stream`, before the slot is handed on
        self.ready = torch.cuda.Event()
        self.ready.record(stream)
        return results


def _view(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The leading part of a preallocated buffer as a contiguous tensor of `shape` (same address)."""
    n = 1
    for d in shape:
        n *= d
    return buf.view(-1)[:n].view(shape)


def _check_engine_io(engine: Any, trt: Any, table: tuple[Binding, ...], path: Path, doc: EngineManifest) -> None:
    """`path`: the engine file (its folder is where the set lives now)."""
    """The deserialized engine has exactly the tensors, dtypes and profiles the backend binds."""
    got = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        profile = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0)) if is_input else None
        got[name] = Binding(name, is_input, TRT_DTYPES.get(engine.get_tensor_dtype(name).name, "?"), profile)
    want = {b.name: b for b in table}
    if got != want:
        raise EngineSetError(f"{path} binds {sorted(got.values(), key=str)}, the backend expects "
                             f"{sorted(want.values(), key=str)}; rebuild: {rebuild_command(doc, path.parent)}")


class StreamedWeights:
    """One engine's weights for the memory modes (runtime/memory.py): `load` raises its streaming
    budget to the backend's weight_streaming_budget (or all its streamable weights), `unload` drops
    it to 0; every slot's context of the engine is recreated after a change, as TensorRT requires."""

    def __init__(self, backend: TrtBackend, comp: str) -> None:
        self.backend, self.comp = backend, comp
        self.engine, self.table = backend._engines[comp]
        self.full = self.backend.budget if self.backend.budget is not None else self.engine.streamable_weights_size
        self.nbytes = self.full
        self._set(0)

    def _set(self, budget: int) -> None:
        slots = [self.backend._slots.get() for _ in range(self.backend.n_slots)]  # waits until none runs
        try:
            self.engine.weight_streaming_budget_v2 = budget
            for slot in slots:
                slot.make_context(self.comp, self.engine, self.table)
        finally:
            for slot in slots:
                self.backend._slots.put(slot)

    def load(self, stream: Any = None) -> None:
        self._set(self.full)

    def wait(self) -> None:
        """Budget changes are synchronous."""

    def unload(self) -> None:
        self._set(0)

    def resident(self) -> bool:
        return self.engine.weight_streaming_budget_v2 > 0


class TensorRTBackend(TrtBackend):
    flavor = "tensorrt"


class TensorRTRtxBackend(TrtBackend):
    flavor = "tensorrt-rtx"


FLAVOR_BACKENDS = {b.flavor: b for b in (TensorRTBackend, TensorRTRtxBackend)}
