"""LoRAs on the torch backends: `pipe.load_lora(path)`, per-call `loras={"style": 0.7}`, `fuse=True`.

Unfused (the default) a LoRA takes one of the pipeline's `lora_slots` slots (default 2, max rank
`lora_max_rank` = 64; set both before the first load) in every layer it touches, as a low-rank side
path beside the untouched base weights (models/lora_linear.py): the strengths of a call are a
tensor [rows, slots], so they differ per image of a batch and switching LoRAs or strengths
changes no shape (no recompile, no CUDA-graph re-capture). Loading a LoRA that touches a layer no
earlier LoRA touched wraps that layer (the one time a compiled model recompiles). Layers of the
MMDiT, CLIP-L and CLIP-G are patched, as diffusers' SD3 loader does. `fuse=True` adds s·BA into the
weights (FP8: re-quantized once with a recomputed scale, from the checkpoint's bf16 weight where
the backend can read it, `source_weight`) at zero per-step cost; its strength is fixed.

Thread safety: load/unload wait for the running calls to finish and hold new ones back; each
component call of a LoRA pipeline writes its rows' strengths and runs under one lock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import CheckpointError, InvalidInputError
from .lora_files import LoraFile, read_lora
from .models.lora_linear import LoraBank, fuse_deltas, install, is_linear
from .text import PromptEncoder

MAX_SCALE = 8.0  # |strength| per LoRA per call
_FUSED_QKV = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2),
              "add_q_proj": ("add_qkv", 0), "add_k_proj": ("add_qkv", 1), "add_v_proj": ("add_qkv", 2)}


@dataclass(frozen=True)
class LoadedLora:
    name: str
    file: LoraFile
    slot: int | None  # None: fused into the weights
    scale: float = 1.0  # fused LoRAs: the strength they were fused with

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file.path.name, "sha256": self.file.sha256, "rank": self.file.rank,
                "components": sorted(self.file.parts), "fused": self.slot is None,
                **({"scale": self.scale} if self.slot is None else {})}


def inner(module: nn.Module) -> nn.Module:
    """The nn.Module whose layers a component runs (past torch.compile and the text-graph wrapper)."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "model", module) if not hasattr(module, "transformer_blocks") else module


def resolve(model: nn.Module, comp: str, name: str, a: torch.Tensor, b: torch.Tensor,
            path: Path) -> tuple[str, int, int]:
    """(layer name in `model`, group, groups) for the LoRA layer `name`: q/k/v find their fused
    projection on torch-fp8. CheckpointError naming the key and both shapes when it does not fit."""
    target, group, groups = name, 0, 1
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        parent, _, leaf = name.rpartition(".")
        fused, group = _FUSED_QKV.get(leaf, (None, 0))
        target, groups = f"{parent}.{fused}", 3
        try:
            layer = model.get_submodule(target) if fused else None
        except AttributeError:
            layer = None
        if layer is None:
            raise CheckpointError(f"LoRA {path}: layer {comp}.{name} does not exist in this model; "
                                  f"is the LoRA for SD3.5 {'' if comp == 'transformer' else 'CLIP '}at all?") from None
    if not is_linear(layer):
        raise CheckpointError(f"LoRA {path}: {comp}.{name} is a {type(layer).__name__}, not a Linear")
    want = (layer.out_features // groups, layer.in_features)
    if (b.shape[0], a.shape[1]) != want:
        raise CheckpointError(f"LoRA {path}: {comp}.{name}: the model's weight is {list(want)} but the LoRA's "
                              f"up @ down is [{b.shape[0]}, {a.shape[1]}] (up {list(b.shape)}, down {list(a.shape)}); "
                              f"this LoRA was trained for another model size")
    return target, group, groups


def plan(models: Mapping[str, nn.Module], lora: LoraFile) -> list[tuple[str, str, int, int, Any]]:
    """Every (component, layer, group, groups, part) of `lora`, checked against `models` before any change."""
    out = []
    for comp, mods in lora.parts.items():
        if comp not in models:
            raise CheckpointError(f"LoRA {lora.path} patches {comp}, which this pipeline has not loaded")
        model = models[comp]
        for name, part in sorted(mods.items()):
            out.append((comp, *resolve(model, comp, name, part.down, part.up, lora.path), part))
    return out


def fuse_lora(models: Mapping[str, nn.Module], lora: LoraFile, scale: float,
              source: Callable[[str, str], torch.Tensor | None] | None = None) -> int:
    """W += scale · B A in every layer of `lora` (in place; FP8 layers re-quantized once, from
    `source(component, layer)`, the layer's high-precision weight, where it gives one). Returns the layer count."""
    steps = plan(models, lora)
    per_layer: dict[tuple[str, str], list] = {}
    for comp, target, group, groups, part in steps:
        per_layer.setdefault((comp, target), []).append((group, groups, scale * (part.up @ part.down)))  # [out/G, in]
    for (comp, target), deltas in per_layer.items():
        read = None if source is None else (lambda c=comp, t=target: source(c, t))
        fuse_deltas(models[comp].get_submodule(target), deltas, read)
    return len(steps)


def attach(models: Mapping[str, nn.Module], lora: LoraFile, slot: int, bank_for: Any) -> None:
    """Put `lora` into slot `slot` of the side path of every layer it touches (wrapping the layer on
    first use); `bank_for(component, model)` gives the component's LoraBank."""
    for comp, target, group, groups, part in plan(models, lora):
        install(models[comp], target, bank_for(comp, models[comp]), groups).set_slot(slot, group, part.down, part.up)


def check_scale(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > MAX_SCALE:
        raise InvalidInputError(f"{where}={value!r}: a LoRA strength is a finite number in "
                                f"[-{MAX_SCALE:g}, {MAX_SCALE:g}]")
    return float(value)


class _Banked:
    """A component callable that first writes its rows' strengths into `bank` (under `lock`)."""

    def __init__(self, call: Any, bank: LoraBank, rows: torch.Tensor, lock: threading.Lock) -> None:
        self.call, self.bank, self.rows, self.lock = call, bank, rows, lock

    def __call__(self, *args: torch.Tensor, **kw: Any) -> Any:
        n = args[0].shape[0]  # CFG runs [negatives; prompts]: the rows repeat per half
        with self.lock:
            self.bank.set_rows(self.rows.repeat(n // self.rows.shape[0], 1))
            return self.call(*args, **kw)


class _View:
    """The backend with some component callables replaced (for one call's PromptEncoder)."""

    def __init__(self, backend: Any, **calls: Any) -> None:
        self._backend, self.__dict__["_calls"] = backend, calls

    def __getattr__(self, key: str) -> Any:
        return self._calls[key] if key in self._calls else getattr(self._backend, key)


class LoraMixin:
    """The LoRA part of `Pipeline` (needs its backend, config, encode, _state and _running)."""

    lora_slots = 2
    lora_max_rank = 64

    def _init_loras(self) -> None:
        self._loras: dict[str, LoadedLora] = {}
        self._banks: dict[str, LoraBank] = {}
        self._lora_call_lock = threading.Lock()

    @property
    def loras(self) -> list[str]:
        """Names of the loaded LoRAs, in load order."""
        return list(self._loras)

    def lora_info(self) -> list[dict[str, Any]]:
        return [x.describe() for x in self._loras.values()]

    def _lora_models(self) -> dict[str, nn.Module]:
        modules = getattr(self.backend, "modules", None)
        if not isinstance(modules, dict) or not isinstance(modules.get("transformer"), nn.Module):
            raise InvalidInputError(f"backend {self.backend.name!r} runs exported graphs: LoRAs cannot be loaded at "
                                    f"run time; fuse them at export (`sd35trt export --lora FILE[:SCALE]`) or use "
                                    f"backend='torch' / 'torch-fp8'")
        return {c: inner(modules[c]) for c in ("transformer", "clip_l", "clip_g") if c in modules}

    def load_lora(self, path: str | Path, name: str | None = None, fuse: bool = False, scale: float = 1.0) -> str:
        """Load the LoRA at `path` (safetensors) under `name` (default: the file's stem); returns
        the name. `fuse=True` adds it into the weights at `scale` for good (unload refuses it)."""
        models = self._lora_models()
        name = Path(path).stem if name is None else name
        self._check_name(name)
        scale = check_scale("scale", scale)
        lora = read_lora(path, self.config.transformer.num_layers)
        plan(models, lora)  # every shape checked before anything changes
        with self._state:
            self._state.wait_for(lambda: self._running == 0)  # new calls wait on _state meanwhile
            self._check_name(name)  # again: another thread may have loaded it meanwhile
            if fuse:
                fuse_lora(models, lora, scale, getattr(self.backend, "source_weight", None))
                self._loras[name] = LoadedLora(name, lora, None, scale)
                return name
            slot = self._free_slot(name, lora)
            attach(models, lora, slot, self._bank)
            self._loras[name] = LoadedLora(name, lora, slot)
        return name

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name or name in self._loras:
            raise InvalidInputError(f"LoRA name={name!r} is {'taken' if name in self._loras else 'not a name'}; "
                                    f"pass another name= (loaded: {self.loras})")

    def _free_slot(self, name: str, lora: LoraFile) -> int:
        if lora.rank > self.lora_max_rank:
            raise InvalidInputError(f"LoRA {name!r} has rank {lora.rank} > lora_max_rank={self.lora_max_rank}; set "
                                    f"pipe.lora_max_rank before the first load_lora, or load it with fuse=True")
        used = {x.slot for x in self._loras.values()}
        free = [s for s in range(self.lora_slots) if s not in used]
        if not free:
            raise InvalidInputError(f"all {self.lora_slots} LoRA slots are in use ({self.loras}); unload one "
                                    f"(pipe.unload_lora(name)) or set pipe.lora_slots before the first load_lora")
        return free[0]

    def _bank(self, comp: str, model: nn.Module) -> LoraBank:
        if comp not in self._banks:
            p = next(model.parameters())  # the compute dtype (FP8 models keep norms/embeddings in bf16)
            dtype = torch.bfloat16 if p.dtype not in (torch.float32, torch.float16) else p.dtype
            # the backend's device: under memory="low" the weights may sit in host memory right now
            self._banks[comp] = LoraBank(self.lora_slots, self.lora_max_rank, self.backend.device, dtype)
        return self._banks[comp]

    def unload_lora(self, name: str) -> None:
        """Free the slot of LoRA `name` (its layers keep a zero side path, so nothing recompiles)."""
        models = self._lora_models()
        with self._state:
            self._state.wait_for(lambda: self._running == 0)
            entry = self._loras.get(name)
            if entry is None:
                raise InvalidInputError(f"LoRA name={name!r} is not loaded (loaded: {self.loras})")
            if entry.slot is None:
                raise InvalidInputError(f"LoRA {name!r} was fused into the weights; load the pipeline again "
                                        f"to remove it")
            for comp, target, group, groups, _ in plan(models, entry.file):
                models[comp].get_submodule(target).set_slot(entry.slot, group, None, None)
            del self._loras[name]

    def lora_rows(self, loras: Any, batch: int) -> torch.Tensor | None:
        """`loras` of a call ({name: strength}, or one such dict per image) as strengths
        [batch, slots]; None when the call names none. InvalidInputError naming the bad entry."""
        per_image = self._per_image(loras, batch)
        if per_image is None:
            return None
        rows = torch.zeros(batch, self.lora_slots)  # [B, S]
        for i, d in enumerate(per_image):
            for key, value in d.items():
                entry = self._loras.get(key)
                if entry is None or entry.slot is None:
                    why = "is fused into the weights (fixed strength)" if entry else "is not loaded"
                    raise InvalidInputError(f"loras[{key!r}]: LoRA {key!r} {why}; loaded unfused: "
                                            f"{[n for n, x in self._loras.items() if x.slot is not None]}")
                rows[i, entry.slot] = check_scale(f"loras[{key!r}]", value)
        return rows

    @staticmethod
    def _per_image(loras: Any, batch: int) -> tuple[dict, ...] | None:
        if loras is None or loras == {} or loras == []:
            return None
        per_image = list(loras) if isinstance(loras, (list, tuple)) else [loras] * batch
        if len(per_image) != batch or not all(isinstance(d, Mapping) for d in per_image):
            raise InvalidInputError(f"loras={loras!r}: pass one dict {{name: strength}}, or a list of {batch} "
                                    f"such dicts (one per image)")
        return tuple(dict(d) for d in per_image)

    def with_loras(self, req: Any, loras: Any) -> Any:
        """`req` with the call's LoRAs checked (names, strengths) and kept per image; the slots are
        looked up again when the call runs (load/unload cannot happen while it does)."""
        if self.lora_rows(loras, req.batch) is None:
            return req
        return replace(req, loras=self._per_image(loras, req.batch))

    def lora_calls(self, req: Any) -> tuple[PromptEncoder, Any]:
        """The (prompt encoder, transformer) of one call: with the call's strengths where LoRAs are in place."""
        b = self.backend
        if not self._banks:
            return self.encode, b.transformer
        rows = self.lora_rows(getattr(req, "loras", None), req.batch)
        rows = rows if rows is not None else torch.zeros(req.batch, self.lora_slots)  # [B, S]
        lock = self._lora_call_lock
        calls = {c: _Banked(getattr(b, c), self._banks[c], rows, lock) for c in self._banks}
        transformer = calls.pop("transformer", b.transformer)
        e = self.encode
        while not hasattr(e, "tok_l"):  # a prompt cache (memory modes) wraps the encoder: its results
            e = e.encode  # hold no LoRA, so a LoRA pipeline encodes afresh
        return PromptEncoder(e.config, (e.tok_l, e.tok_g, e.tok_t5), _View(b, **calls)), transformer
