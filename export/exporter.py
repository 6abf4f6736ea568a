"""`sd35trt export`: checkpoint -> (FP8 calibration) -> ONNX for every component + manifest.

Idempotent: each component's fingerprint hashes its source weights, the export options and (for
the FP8 transformer) the calibration; a component whose manifest entry has the same fingerprint
and whose files still have the recorded sha256 is not exported again. Files are written
atomically and the manifest is rewritten after each finished component (a per-component commit),
so an interrupted or killed export keeps what it finished, and the next run removes the temp
files and folders it left and does only the rest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..runtime.backends.torch_backend import TorchBackend
from ..runtime.checkpoint import Checkpoint, ExportedFolder
from ..runtime.components import TABLE, graph_component
from ..runtime.control_graph import ControlNetRecord, make_record
from ..runtime.config import VariantConfig
from ..runtime.errors import CheckpointError, InvalidInputError
from ..runtime.files import MANIFEST, remove_temporaries, sha256_file
from ..runtime.manifest import ExportEntry, ExportManifest, HashCache
from ..runtime.models.loader import load_modules
from ..runtime.text import PromptEncoder, load_tokenizers
from .artifacts import copy_tokenizers
from .calibrate import CalibSettings, CalibState, apply_calibration, calibrate
from .controlnet_export import CONTROLNET_CALIB, add_controlnet
from .loras import fingerprint_part, fuse_records, lora_records
from .onnx_export import export_graph

EXPORTER_VERSION = "1"
PRECISIONS = ("fp8", "bf16", "fp16", "fp32")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SOURCES = {"vae_decoder": "vae", "vae_encoder": "vae"}  # component -> Checkpoint.files key


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp8"  # fp8: MMDiT linears in FP8, everything else in `dtype`
    dtype: str = "fp16"  # high-precision dtype (fp8), or the precision itself otherwise
    calib: CalibSettings = field(default_factory=CalibSettings)
    t5: bool = True
    vae_encoder: bool = True
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale): fused before calibration (export/loras.py)
    controlnet: str | None = None  # a ControlNet folder or file: its graph + the residual transformer

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.precision != "fp8" and self.dtype != self.precision:
            object.__setattr__(self, "dtype", self.precision)
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")


@dataclass
class Row:
    component: str
    file: str
    bytes: int
    precision: str
    qdq_pairs: int
    status: str  # "exported" | "cached"
    seconds: float


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(ckpt: Checkpoint, component: str) -> str:
    """Content hash of the files a component is built from (a folder's weights+configs, or a file)."""
    src = ckpt.files[SOURCES.get(component, component)]
    files = sorted(p for p in src.glob("*") if p.suffix in (".safetensors", ".json")) if src.is_dir() else [src]
    return _fingerprint([(p.name, sha256_file(p)) for p in files])


def _saved_calibration(folder: Path, fp: str) -> CalibState | None:
    try:
        state = CalibState.load(folder)
    except (CheckpointError, OSError, ValueError, KeyError):
        return None
    return state if state.meta.get("fingerprint") == fp else None


def _reusable_calibration(ckpt: Checkpoint, out: Path, opts: ExportOptions, loras: list,
                          net: ControlNetRecord | None) -> tuple[str, dict[str, CalibState] | None]:
    """(calibration input fingerprint, the saved calibrations {transformer[, controlnet]} if they
    were made from the same inputs; with a ControlNet both are made together, export/controlnet_export.py)."""
    fp = _fingerprint(source_fingerprint(ckpt, "transformer"), asdict(opts.calib), opts.dtype,
                      *([fingerprint_part(loras)] if loras else []), *([net.sha256] if net else []))
    folders = {"transformer": out / "calibration", **({"controlnet": out / CONTROLNET_CALIB} if net else {})}
    states = {c: _saved_calibration(f, fp) for c, f in folders.items()}
    return fp, states if all(states.values()) else None


def _plan(ckpt: Checkpoint, opts: ExportOptions, calib: dict[str, CalibState] | None, loras: list,
          net: ControlNetRecord | None = None) -> dict[str, str]:
    """Fingerprint of every component to export (the FP8 transformer's and ControlNet's need the
    calibration; with a ControlNet the transformer graph takes its residuals)."""
    wanted = {"t5": opts.t5 and ckpt.files.get("t5") is not None, "vae_encoder": opts.vae_encoder}
    comps = [c.name for c in TABLE if wanted.get(c.name, True)] + (["controlnet"] if net else [])
    plan = {}
    for comp in comps:
        fp8 = opts.precision == "fp8" and comp in ("transformer", "controlnet")
        amax = ((calib or {}).get(comp) and calib[comp].amax) if fp8 else "-"
        spec = graph_component(comp, net.residuals if net else None)
        io = (spec.input_names, spec.output_names)  # a graph of other I/O is stale
        lora = fingerprint_part(loras, comp)
        source = source_fingerprint(ckpt, "transformer" if comp == "controlnet" else comp)  # shared patch embedding
        extra = [net.sha256, net.residuals] if net and comp in ("transformer", "controlnet") else []
        plan[comp] = _fingerprint(EXPORTER_VERSION, comp, io, opts.dtype, fp8, amax, source,
                                  *([lora] if lora else []), *extra)
    return plan


def _open_source(model: str | Path, out: Path, opts: ExportOptions) -> Checkpoint:
    """The checkpoint to export (configs and headers only); refuses an export folder or engine set
    as the source and a checkpoint folder as the output, naming the fix."""
    ckpt = Checkpoint.open(model, t5=None if opts.t5 else False)
    if isinstance(ckpt, ExportedFolder):
        source = getattr(ckpt.manifest, "source", "") or "the original checkpoint"
        raise CheckpointError(f"model={str(model)!r} holds exported graphs or engines ({MANIFEST}), not "
                              f"weights; export from the checkpoint: model={source!r}")
    if out.resolve() == Path(ckpt.path).resolve() or ((out / "model_index.json").is_file() and not (out / MANIFEST).is_file()):
        raise InvalidInputError(f"out={str(out)!r} is a checkpoint folder; write the export to a folder of its "
                                f"own, e.g. out={str(out.parent / (out.name + '-onnx'))!r}")
    return ckpt


def remove_leftovers(out: Path) -> list[Path]:
    """Temp files and folders of an export that was killed (they never hold finished work): the
    `.*.tmp` of this version, and the `.<component>.onnx.<random>/` folders earlier ones left."""
    removed = remove_temporaries(out) + remove_temporaries(out / "calibration") + remove_temporaries(out / CONTROLNET_CALIB)
    for p in out.glob(".*.onnx.*"):
        if p.is_dir() and p.name[1:].partition(".onnx.")[0] in {c.name for c in TABLE} | {"controlnet"}:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def export_model(model: str | Path, out: str | Path, opts: ExportOptions, progress: bool = True) -> list[Row]:
    out = Path(out)
    ckpt = _open_source(model, out, opts)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    old = ExportManifest.load_existing(out)
    hashes = HashCache(out)  # hashes taken while writing: a re-run and the first load need not hash again
    loras = lora_records(opts.loras)
    net = make_record(opts.controlnet, ckpt.config.transformer, hashes) if opts.controlnet else None
    calib_fp, calib = _reusable_calibration(ckpt, out, opts, loras, net) if opts.precision == "fp8" else ("", None)
    plan = _plan(ckpt, opts, calib, loras, net)
    todo = [c for c, fp in plan.items()
            if not (old and c in old.components and old.components[c].is_fresh(out, fp, hashes))]
    entries = {c: old.components[c] for c in plan if c not in todo}
    rows = [Row(c, e.file, e.bytes, e.precision, e.qdq_pairs, "cached", 0.0) for c, e in entries.items()]
    copy_tokenizers(ckpt, out)

    def commit() -> None:  # the manifest lists exactly the finished, current components
        ExportManifest(ckpt.config, opts.precision, opts.dtype, str(ckpt.path), dict(entries), loras=loras,
                       controlnet=net.to_dict() if net else None).save(out)
        hashes.save()

    commit()
    if todo:  # load the checkpoint only when something must be (re)built
        mods, calib = _modules(ckpt, opts, calib, calib_fp, out, todo, progress, loras, net)
        plan = _plan(ckpt, opts, calib, loras, net)
        for comp in tqdm(todo, desc="export", disable=not progress):
            t0 = time.perf_counter()
            spec = graph_component(comp, net.residuals if net else None)
            entries[comp] = e = _export_one(mods[comp], spec, ckpt.config, DTYPES[opts.dtype], out, opts, plan[comp])
            for name, digest in e.hashed_files():
                hashes.put(name, digest)
            commit()
            rows.append(Row(comp, e.file, e.bytes, e.precision, e.qdq_pairs, "exported", time.perf_counter() - t0))
    _t5_calibration(ckpt, out, opts)
    return sorted(rows, key=lambda r: list(plan).index(r.component))


def _modules(ckpt: Checkpoint, opts: ExportOptions, calib: dict[str, CalibState] | None, calib_fp: str, out: Path,
             todo: list[str], progress: bool, loras: list,
             net: ControlNetRecord | None) -> tuple[dict[str, torch.nn.Module], dict[str, CalibState] | None]:
    """The torch modules to trace (the runtime's loader); for FP8 the MMDiT calibrated (or the saved
    calibration re-applied) with the runtime's own text encoders and loop (with a ControlNet: the
    two jointly, `controlnet_export.add_controlnet`)."""
    dtype, cpu = DTYPES[opts.dtype], torch.device("cpu")
    calibrating = opts.precision == "fp8" and calib is None  # the text encoders run the calibration prompts
    text = ("clip_l", "clip_g", "t5", *(("vae_encoder",) if net else ())) if calibrating else ()
    names = [c for c in dict.fromkeys([*todo, *text]) if c != "controlnet"]
    mods = load_modules(ckpt, names, cpu, dtype)  # the transformer is in todo when calibrating
    fuse_records(mods, loras, ckpt.config.transformer.num_layers)  # before calibration (ModelOpt's advice)
    if net is not None and ("controlnet" in todo or calibrating):
        return add_controlnet(ckpt, mods, net, opts.calib if opts.precision == "fp8" else None, calib, calib_fp,
                              out, dtype, progress)
    if opts.precision == "fp8" and "transformer" in mods:
        if calib is None:
            encode = PromptEncoder(ckpt.config, load_tokenizers(ckpt), TorchBackend.from_modules(mods, cpu, dtype))
            state, mods["transformer"] = calibrate(encode, mods["transformer"], opts.calib, progress=progress)
            state.meta["fingerprint"] = calib_fp
            state.save(out / "calibration")
            calib = {"transformer": state}
        else:
            mods["transformer"] = apply_calibration(mods["transformer"], calib["transformer"])
    return mods, calib


def _t5_calibration(ckpt: Checkpoint, out: Path, opts: ExportOptions) -> None:
    """FP8 exports with T5: its activation amax over the calibration prompts, beside the MMDiT's
    (calibration/t5_amax.safetensors, for the torch-fp8 backend's FP8 T5 GEMMs; the ONNX graphs
    do not use it). Kept when made from the same T5, prompts, count and dtype."""
    from ..runtime.models.fp8_text import load_t5_amax, save_t5_amax
    from .calibrate import calibrate_t5, prompts_digest, read_prompts

    if opts.precision != "fp8" or not opts.t5 or ckpt.files.get("t5") is None:
        return
    fp = _fingerprint(source_fingerprint(ckpt, "t5"), prompts_digest(*read_prompts(opts.calib.num_prompts)),
                      opts.calib.num_prompts, opts.dtype)
    try:
        saved = load_t5_amax(out / "calibration")
    except CheckpointError:  # unreadable: made again
        saved = None
    if saved is not None and saved[1].get("fingerprint") == fp:
        return
    tokenizer = load_tokenizers(ckpt)[2]
    if tokenizer is None:  # no T5 tokenizer: the runtime cannot run T5 either
        return
    t5 = load_modules(ckpt, ["t5"], torch.device("cpu"), DTYPES[opts.dtype])["t5"]
    amax, meta = calibrate_t5(t5, tokenizer, ckpt.config, opts.calib.num_prompts)
    save_t5_amax(amax, out / "calibration", {**meta, "fingerprint": fp, "dtype": opts.dtype})


def _export_one(module, spec, config: VariantConfig, dtype, out: Path, opts: ExportOptions, fp: str) -> ExportEntry:
    comp = spec.name
    fp8 = opts.precision == "fp8" and comp in ("transformer", "controlnet")
    path = out / f"{comp}.onnx"
    stats = export_graph(module, comp, spec.sample_inputs(config, dtype), path, fp8, spec)
    return ExportEntry(file=path.name, data=stats.data, data_sha256=stats.data_sha256, sha256=sha256_file(path),
                       bytes=stats.bytes,
                       precision="fp8" if fp8 else opts.dtype, qdq_pairs=stats.qdq_pairs, fp8_weights=stats.fp8_weights,
                       quantized_linears=list(stats.quantized_linears), fingerprint=fp)


def format_table(rows: list[Row]) -> str:
    head = f"{'component':<12} {'file':<18} {'size':>10} {'precision':>9} {'Q/DQ':>6} {'status':>9} {'time':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.component:<12} {r.file:<18} {r.bytes / 2**20:>8.2f}MB {r.precision:>9} "
                     f"{r.qdq_pairs:>6} {r.status:>9} {r.seconds:>6.1f}s")
    return "\n".join(lines)
