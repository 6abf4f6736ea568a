"""The component table: one frozen record per model component, read by export, build and runtime.

A `Component` holds everything that must agree between the ONNX export, the TensorRT engine
build, the backends and the engine-shape checks: its input and output tensors (names, dtype rule,
dynamic axes), whether CFG doubles its batch, whether it is optional, and the shape of every input
for a request. Adding a component (a ControlNet, the VAE encoder at run time) is one record here
plus its module in `runtime/models/`.

Dtype rule: a tensor with `dtype=None` takes the component's float precision (the export dtype,
e.g. "float16"); token ids are always int64 and the timestep always float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from .errors import InvalidInputError

if TYPE_CHECKING:  # config emits profiles through this table; the table needs the config's type only
    from .config import VariantConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Tensor:
    name: str
    axes: Mapping[int, str]  # dynamic axes: dim -> symbol ("B" batch, "h"/"w" latent, "T" tokens, ...)
    dtype: str | None = None  # fixed dtype name, or None: the component's float precision
    kind: str = "float"  # how a tracing sample is drawn: "float", "ids", "timestep", "image", "skip"


@dataclass(frozen=True)
class RequestShape:
    """One request as the components see it: model batch (CFG already applied where it doubles),
    latent side, T5 tokens."""

    batch: int
    height: int
    width: int
    t5_tokens: int


@dataclass(frozen=True)
class Component:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    input_shapes: Callable[[VariantConfig, RequestShape], dict[str, Shape]]
    cfg_doubled: bool  # batch doubles under CFG ([negatives; prompts] or [x; x])
    optional: bool = False  # the pipeline runs without it (T5: zeros)
    runtime: bool = True  # loaded by the backends (False: exported for later use only)
    engine: bool = True  # in TensorRT engine sets (`sd35trt build`, the TensorRT backends)

    @property
    def skips_blocks(self) -> bool:
        """It takes a per-block skip input (skip-layer guidance: one graph for plain and skip passes)."""
        return any(t.kind == "skip" for t in self.inputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: dict(t.axes) for t in self.inputs + self.outputs}

    def dtypes(self, float_dtype: str) -> dict[str, str]:
        """Tensor name -> dtype name ("float32", "float16", "bfloat16", "int64") for one precision."""
        return {t.name: t.dtype or float_dtype for t in self.inputs + self.outputs}

    def shapes(self, config: VariantConfig, batch: int, height: int, width: int,
               t5_tokens: int | None = None) -> dict[str, Shape]:
        """Input shapes for a request of `batch` model rows (CFG already counted) at height x width."""
        return self.input_shapes(config, RequestShape(batch, height, width, t5_tokens or config.max_sequence_length))

    def sample_inputs(self, config: VariantConfig, dtype: torch.dtype, vocab: int = 100) -> tuple[torch.Tensor, ...]:
        """Small tracing inputs: batch 2 (so the batch axis never specialises to 1), 64x96 pixels,
        16 T5 tokens; token ids below 100 are valid in every vocabulary (tiny ones too)."""
        g = torch.Generator().manual_seed(0)
        shapes = self.shapes(config, 2, 64, 96, 16)
        out = []
        for t in self.inputs:
            shape = shapes[t.name]
            if t.kind == "ids":
                out.append(torch.randint(0, vocab, shape, generator=g))
            elif t.kind == "timestep":
                out.append(torch.tensor([1000.0, 500.0]))  # timesteps stay fp32
            elif t.kind == "skip":
                out.append(torch.zeros(shape))  # no block skipped; the flags stay fp32
            elif t.kind == "image":
                out.append(torch.rand(shape, generator=g).to(dtype) * 2 - 1)  # [-1, 1]
            else:
                out.append(torch.randn(shape, generator=g).to(dtype))
        return tuple(out)


def _ids(c: VariantConfig, r: RequestShape, tokens: int) -> dict[str, Shape]:
    return {"input_ids": (r.batch, tokens)}


def _transformer(c: VariantConfig, r: RequestShape) -> dict[str, Shape]:
    latent = c.latent_shape(r.batch, r.height, r.width)  # [B, 16, H/8, W/8]
    return {"hidden_states": latent, "timestep": (r.batch,),
            "encoder_hidden_states": (r.batch, c.text_tokens(r.t5_tokens), c.joint_dim),  # [B, 77+T, 4096]
            "pooled_projections": (r.batch, c.pooled_dim),  # [B, 2048]
            "skip_layers": (c.transformer.num_layers,)}  # [L] 1.0 = block skipped (skip-layer guidance)


_B = {0: "B"}
_LATENT = {0: "B", 2: "h", 3: "w"}
_IMAGE = {0: "B", 2: "H", 3: "W"}
_CLIP_IO = dict(
    inputs=(Tensor("input_ids", _B, "int64", "ids"),),
    outputs=(Tensor("hidden_states", _B), Tensor("text_embeds", _B)),  # [B, 77, C] penultimate, [B, C]
    input_shapes=lambda c, r: _ids(c, r, c.clip_tokens), cfg_doubled=True,
)

TABLE: tuple[Component, ...] = (
    Component("clip_l", **_CLIP_IO),
    Component("clip_g", **_CLIP_IO),
    Component("t5", inputs=(Tensor("input_ids", {0: "B", 1: "T"}, "int64", "ids"),),
              outputs=(Tensor("hidden_states", {0: "B", 1: "T"}),),  # [B, T, 4096]
              input_shapes=lambda c, r: _ids(c, r, r.t5_tokens), cfg_doubled=True, optional=True),
    Component("transformer",
              inputs=(Tensor("hidden_states", _LATENT), Tensor("timestep", _B, "float32", "timestep"),
                      Tensor("encoder_hidden_states", {0: "B", 1: "S"}), Tensor("pooled_projections", _B),
                      Tensor("skip_layers", {}, "float32", "skip")),
              outputs=(Tensor("velocity", _LATENT),),  # [B, 16, h, w]
              input_shapes=_transformer, cfg_doubled=True),
    Component("vae_decoder", inputs=(Tensor("latent", _LATENT),), outputs=(Tensor("image", _IMAGE),),
              input_shapes=lambda c, r: {"latent": c.latent_shape(r.batch, r.height, r.width)},
              cfg_doubled=False),
    # moments = mean ++ log-variance of the posterior [B, 32, H/8, W/8] (unscaled); the runtime samples it.
    Component("vae_encoder", inputs=(Tensor("image", _IMAGE, kind="image"),), outputs=(Tensor("moments", _LATENT),),
              input_shapes=lambda c, r: {"image": (r.batch, 3, r.height, r.width)},
              cfg_doubled=False, optional=True),
)
def _controlnet(c: VariantConfig, r: RequestShape) -> dict[str, Shape]:
    shapes = {k: v for k, v in _transformer(c, r).items() if k != "skip_layers"}  # a ControlNet runs every block
    return {**shapes, "controlnet_cond": c.latent_shape(r.batch, r.height, r.width)}  # cond: [B, 16, h, w]


# A ControlNet (runtime/control.py) is exported on its own (export/controlnet_export.py), beside a
# model's export: one record, outside TABLE (not every model has one). residuals: [R, B, h*w/4, D].
CONTROLNET = Component(
    "controlnet", inputs=(Tensor("hidden_states", _LATENT), Tensor("controlnet_cond", _LATENT),
                          Tensor("timestep", _B, "float32", "timestep"), Tensor("encoder_hidden_states", {0: "B", 1: "S"}),
                          Tensor("pooled_projections", _B)),
    outputs=(Tensor("residuals", {1: "B", 2: "N"}),),
    input_shapes=lambda c, r: _controlnet(c, r), cfg_doubled=True, optional=True, runtime=False, engine=False)
BY_NAME: dict[str, Component] = {c.name: c for c in (*TABLE, CONTROLNET)}
# The components the backends load (optional ones where present).
RUNTIME: tuple[Component, ...] = tuple(c for c in TABLE if c.runtime)
# The components engine sets hold, in build order (`COMPONENTS`: their names).
ENGINES: tuple[Component, ...] = tuple(c for c in RUNTIME if c.engine)
COMPONENTS: tuple[str, ...] = tuple(c.name for c in ENGINES)


def controlled_transformer(residuals: int) -> Component:
    """The transformer graph of an export made with a ControlNet (`sd35trt export --controlnet`):
    the table's inputs and `controlnet_residuals` [R, B, h*w/p^2, D], R fixed at export (the
    ControlNet's block count; the MMDiT adds residual int(i / (L / R)) after block i)."""
    base = BY_NAME["transformer"]

    def shapes(c: VariantConfig, r: RequestShape) -> dict[str, Shape]:
        tokens = c.image_tokens(r.height, r.width)  # h*w/p^2
        return {**base.input_shapes(c, r), "controlnet_residuals": (residuals, r.batch, tokens, c.transformer.inner_dim)}

    return replace(base, inputs=(*base.inputs, Tensor("controlnet_residuals", {1: "B", 2: "N"})), input_shapes=shapes)


def graph_component(name: str, residuals: int | None = None) -> Component:
    """The record of component `name` in an export or engine set whose ControlNet gives `residuals`
    (None: made without one): its transformer then takes the residual input."""
    return controlled_transformer(residuals) if residuals and name == "transformer" else component(name)


def component(name: str) -> Component:
    if name not in BY_NAME:
        raise InvalidInputError(f"component {name!r} is unknown; the components are {sorted(BY_NAME)}")
    return BY_NAME[name]


def _engine_parts(residuals: int | None) -> tuple[Component, ...]:
    """What an engine set holds: the table's engine components, with a ControlNet's residual
    transformer and the ControlNet itself when the export has one."""
    if not residuals:
        return ENGINES
    return tuple(graph_component(c.name, residuals) for c in ENGINES) + (CONTROLNET,)


def request_shapes(config: VariantConfig, batch: int, height: int, width: int, t5_tokens: int | None = None,
                   cfg: bool = False, residuals: int | None = None) -> dict[str, dict[str, Shape]]:
    """Input shapes of every engine-set component for `batch` images (CFG doubles where it applies)."""
    return {c.name: c.shapes(config, batch * 2 if cfg and c.cfg_doubled else batch, height, width, t5_tokens)
            for c in _engine_parts(residuals)}


def engine_profiles(config: VariantConfig, sizes: tuple[int, int, int], batches: tuple[int, int, int],
                    cfg: bool, residuals: int | None = None) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """(min, opt, max) shapes per engine-set component input for square sizes and image batches.
    A component that skips blocks also runs the skip-layer pass on the prompts' rows alone ([B],
    not [2B] under CFG), so its minimum batch is not doubled. `residuals`: the export's ControlNet
    block count (its transformer takes the residuals; the ControlNet gets an engine too)."""
    for s in sizes:
        config.check_size(s, s)
    points = [request_shapes(config, b, s, s, cfg=cfg, residuals=residuals) for b, s in zip(batches, sizes)]
    single = request_shapes(config, batches[0], sizes[0], sizes[0], residuals=residuals)  # [B] rows, smallest point
    return {c.name: {n: ((single if c.skips_blocks else points[0])[c.name][n], points[1][c.name][n],
                         points[2][c.name][n]) for n in c.input_names} for c in _engine_parts(residuals)}
