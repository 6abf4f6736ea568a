"""A ControlNet's ONNX graph (component `controlnet`, runtime/components.py), fp32/fp16/bf16 or FP8.

FP8: the ControlNet's Linears (its blocks and `controlnet_blocks`; not its embedders) are
calibrated jointly with the MMDiT's: ModelOpt max calibration of both at once while our runtime
denoises the calibration prompts with the ControlNet conditioning on control images the project
makes itself (`calib_control_images`: canny edges of seeded procedural pictures), so each net sees
the activations it sees at inference. The two calibrations are saved separately
(`<out>/calibration` for the MMDiT, as `sd35trt export` writes it; `<out>/controlnet_calibration`).
`<out>/controlnet.json` records the source, the architecture, the precision and the graph's sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..runtime.backends.base import ComponentCall
from ..runtime.backends.torch_backend import ModuleRun, TorchBackend
from ..runtime.checkpoint import Checkpoint
from ..runtime.components import component
from ..runtime.control import ControlNet, ControlNets, check_control, plan
from ..runtime.control_graph import ControlNetRecord, fingerprint
from ..runtime.errors import CheckpointError, InvalidInputError
from ..runtime.files import sha256_file, write_json_atomic
from ..runtime.models.controlnet import SD3ControlNet, shared_pos_embed
from ..runtime.models.controlnet_file import load_any
from ..runtime.models.loader import load_modules
from ..runtime.pipeline import sample
from ..runtime.requests import normalize_request
from ..runtime.text import PromptEncoder, load_tokenizers
from .calibrate import CalibSettings, CalibState, apply_calibration, collect_amax, quantize_module, read_prompts
from .onnx_export import export_graph

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("transformer", "controlnet")
CONTROLNET_CALIB = "controlnet_calibration"  # beside the MMDiT's `calibration`, made with it


def calib_control_images(n: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    """`n` control images for calibration: white-on-black edges of seeded pictures (discs and bars)."""
    out = []
    for i in range(n):
        g = np.random.default_rng(seed + i)
        yy, xx = np.mgrid[0:height, 0:width]
        img = np.zeros((height, width), np.uint8)
        for _ in range(3):
            cy, cx, r = g.uniform(0, height), g.uniform(0, width), g.uniform(0.1, 0.3) * min(height, width)
            ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.5
            img[ring] = 255
        row = int(g.integers(0, height))
        img[row : row + 2] = 255
        out.append(Image.fromarray(np.repeat(img[..., None], 3, axis=-1)))
    return out


def _joint_exclude(exclude: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{part}.{pat}" for part in PARTS for pat in exclude)


def _split(amax: dict[str, float]) -> dict[str, dict[str, float]]:
    return {part: {k[len(part) + 1:]: v for k, v in amax.items() if k.startswith(part + ".")} for part in PARTS}


def calibrate_joint(encode: PromptEncoder, vae_encoder, mmdit: nn.Module, controlnet: SD3ControlNet,
                    settings: CalibSettings, progress: bool = False) -> tuple[dict[str, CalibState], nn.ModuleDict]:
    """FP8 max calibration of the MMDiT and the ControlNet together over the calibration prompts,
    each with one of `calib_control_images` (our loop, CFG as at inference, seeded). Returns the
    two calibrations (amax names relative to each module) and the quantized pair."""
    prompts, negatives = read_prompts(settings.num_prompts)
    config, device = encode.config, encode.backend.device
    dtype = next(mmdit.parameters()).dtype
    h, w = settings.height or config.default_size, settings.width or config.default_size
    images = calib_control_images(len(prompts), h, w, settings.seed)

    def loop(joint: nn.Module) -> None:
        transformer = ComponentCall(ModuleRun(joint["transformer"], dtype), "transformer")
        run = ModuleRun(joint["controlnet"], dtype)
        nets = ControlNets((ControlNet(Path("calibration"), controlnet.spec, lambda *a: run(*a)[0]),), False)
        for i, prompt in enumerate(tqdm(prompts, desc="calibrate", disable=not progress)):
            req = normalize_request(config, prompt, negative_prompt=negatives[i % len(negatives)], height=h, width=w,
                                    num_inference_steps=settings.steps, guidance_scale=settings.guidance)
            creq = check_control(nets, images[i], 1.0, 0.0, 1.0, h, w, 1, 1, torch.Generator().manual_seed(i))
            control = plan(nets, creq, vae_encoder, config.vae, req, device)
            sample(encode, transformer, device, req, generator=torch.Generator().manual_seed(settings.seed + i),
                   vae_encoder=vae_encoder, control=control)

    joint = nn.ModuleDict({"transformer": mmdit, "controlnet": controlnet})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        joint = quantize_module(joint, _joint_exclude(settings.exclude), loop)
    digest = hashlib.sha256("\n".join(prompts + negatives).encode()).hexdigest()[:16]
    amax = _split(collect_amax(joint))
    return {p: CalibState(amax[p], settings, {"prompts_sha256": digest, "joint": "transformer+controlnet"})
            for p in PARTS}, joint


def add_controlnet(ckpt: Checkpoint, mods: dict[str, nn.Module], net: ControlNetRecord, settings: CalibSettings | None,
                   calib: dict[str, CalibState] | None, calib_fp: str, out: Path, dtype: torch.dtype,
                   progress: bool = False) -> tuple[dict[str, nn.Module], dict[str, CalibState] | None]:
    """`sd35trt export --controlnet`: `mods` plus the recorded ControlNet ("controlnet"). FP8
    (`settings` given): the MMDiT and the ControlNet calibrated jointly (`calibrate_joint`, saved as
    `calibration` and `controlnet_calibration` with fingerprint `calib_fp`), or the saved pair
    re-applied when `calib` holds it. Returns (mods, calibrations)."""
    cpu = torch.device("cpu")
    if fingerprint(net.source) != net.sha256:
        raise CheckpointError(f"--controlnet {net.source} changed while exporting; run the export again")
    cn = load_any(net.source, ckpt.config.transformer, lambda: shared_pos_embed(ckpt.transformer_state()), cpu, dtype)
    if settings is None:
        return {**mods, "controlnet": cn}, calib
    if calib is not None:
        mods = {**mods, "controlnet": apply_calibration(cn, calib["controlnet"])}
        if "transformer" in mods:
            mods["transformer"] = apply_calibration(mods["transformer"], calib["transformer"])
        return mods, calib
    backend = TorchBackend.from_modules(mods, cpu, dtype)
    encode = PromptEncoder(ckpt.config, load_tokenizers(ckpt), backend)
    states, joint = calibrate_joint(encode, backend.vae_encoder, mods["transformer"], cn, settings, progress)
    for state in states.values():
        state.meta["fingerprint"] = calib_fp
    states["transformer"].save(out / "calibration")
    states["controlnet"].save(out / CONTROLNET_CALIB)
    return {**mods, "transformer": joint["transformer"], "controlnet": joint["controlnet"]}, states


def export_controlnet(model: str | Path, controlnet: str | Path, out: str | Path, precision: str = "fp32",
                      dtype: str = "fp32", calib: CalibSettings | None = None, progress: bool = False) -> dict:
    """Write `<out>/controlnet.onnx` for the ControlNet folder `controlnet` beside the model at
    `model` (the MMDiT gives the shared patch embedding and, for FP8, the joint calibration)."""
    if precision not in ("fp8", *DTYPES) or dtype not in DTYPES:
        raise InvalidInputError(f"precision={precision!r} / dtype={dtype!r}: precision is fp8|fp32|fp16|bf16 and "
                                f"dtype fp32|fp16|bf16")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(model)
    cpu, torch_dtype = torch.device("cpu"), DTYPES[dtype if precision == "fp8" else precision]
    names = ["transformer", "vae_encoder", "clip_l", "clip_g", "t5"] if precision == "fp8" else []
    mods = load_modules(ckpt, names, cpu, torch_dtype)
    net = load_any(controlnet, ckpt.config.transformer, lambda: shared_pos_embed(ckpt.transformer_state()),
                          cpu, torch_dtype)
    doc = {"source": str(Path(controlnet).resolve()), "model": str(Path(ckpt.path)), "precision": precision,
           "dtype": dtype if precision == "fp8" else precision, "spec": net.spec.to_config()}
    if precision == "fp8":
        settings = calib or CalibSettings()
        backend = TorchBackend.from_modules(mods, cpu, torch_dtype)
        encode = PromptEncoder(ckpt.config, load_tokenizers(ckpt), backend)
        states, joint = calibrate_joint(encode, backend.vae_encoder, mods["transformer"], net, settings, progress)
        states["transformer"].save(out / "calibration")
        states["controlnet"].save(out / CONTROLNET_CALIB)
        net = joint["controlnet"]
        doc["calibration"] = asdict(replace(settings, exclude=list(settings.exclude)))
    path = out / "controlnet.onnx"
    stats = export_graph(net, "controlnet", component("controlnet").sample_inputs(ckpt.config, torch_dtype), path,
                         precision == "fp8")
    doc.update(file=path.name, sha256=sha256_file(path), bytes=stats.bytes, qdq_pairs=stats.qdq_pairs,
               fp8_weights=stats.fp8_weights, quantized_linears=list(stats.quantized_linears))
    write_json_atomic(out / "controlnet.json", doc)
    return doc


def build_controlnet_engine(onnx_path: str | Path, engine_path: str | Path, config, gpu: str = "sm89",
                            size: int | None = None, batch: int = 1, cfg: bool = True):
    """A TensorRT-RTX engine of a ControlNet graph (built on the CPU, ahead of time) for one static
    shape: `batch` images (doubled under CFG) at size x size pixels, the variant's T5 length."""
    from .trt_build import build_engine

    side = size or config.default_size
    shapes = component("controlnet").shapes(config, batch * 2 if cfg else batch, side, side)
    profiles = {name: (shape, shape, shape) for name, shape in shapes.items()}
    return build_engine(Path(onnx_path), Path(engine_path), flavor="tensorrt-rtx", compute_capability=gpu,
                        profiles=profiles)
