"""The `sd35trt` command line: tiny-model, export, build, generate, bench, serve."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

from . import cli_checks as check
from . import cli_control
from .cli_bench import add_bench_parser
from .cli_build_torch import add_scope_flag, build_torch, refuse_scope
from .cli_checks import UsageError, flagged
from .cli_lora import lora_arg
from .cli_lora import resolve as resolve_loras
from .cli_ray import add_flags as add_ray_flags
from .quiet import library_stdout, quiet_onnxruntime, third_party_quiet

# One vocabulary across flags, arguments, manifests and errors:
#   family    large | medium | large-turbo (what a checkpoint is; --family overrides the detected one)
#   preset    sd3.5-large | sd3.5-large-turbo | sd3.5-medium (released shapes, random weights: bench)
#   precision fp8 | bf16 | fp16 | fp32 (an export); dtype fp32 | fp16 | bf16 (everything not in FP8)
FAMILIES = ("large", "medium", "large-turbo")
DTYPES = ("fp32", "bf16", "fp16")
MODEL_HELP = ("an SD3.5 diffusers folder, a single-file checkpoint (sd3.5_*.safetensors), an `sd35trt export` "
              "folder or an engine set (`sd35trt build`)")
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as shells report it


def _tiny_model(args: argparse.Namespace) -> int:
    import tempfile

    from .export.single_file import write_single_file
    from .export.tiny_model import read_corpus, write_tiny_model

    corpus = read_corpus(args.corpus) if args.corpus else None
    t0 = time.perf_counter()
    if args.layout == "diffusers":
        out = write_tiny_model(args.out_dir, family=args.family, seed=args.seed, corpus=corpus)
    else:  # built as a diffusers folder in a temporary place, then converted
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise FileExistsError(f"{args.out_dir} exists and is not empty; remove it or pick another OUT_DIR")
        args.out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{args.out_dir.name}.", dir=args.out_dir.parent) as tmp:
            folder = write_tiny_model(Path(tmp) / "diffusers", family=args.family, seed=args.seed, corpus=corpus)
            out = write_single_file(folder, args.out_dir).parent
    print(f"wrote tiny SD3.5 {args.family} checkpoint ({args.layout} layout, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    # Everything that needs no torch first: a bad flag answers at once.
    info = check.inspect_model(args.model, family=args.family)
    backend = check.check_backend(info, args.backend)
    options = check.backend_options(args, backend, info.kind)
    check.check_size(info, args.height, args.width)
    if args.quality is not None and args.out.suffix.lower() == ".png":
        raise UsageError(f"--quality applies to JPEG and WebP; {args.out} is a PNG (lossless): drop --quality")
    check.require_cuda(options, backend)
    modes = _mode_arguments(args)  # sampler, image / mask / strength, skip-layer guidance (no torch yet)
    loras = resolve_loras(args.lora, args.lora_dir)
    control = cli_control.control_arguments(args)  # --controlnet / --control-image (no torch yet)
    quiet_onnxruntime(backend == "onnxruntime" and not args.verbose)

    import torch

    from .runtime import Pipeline
    from .runtime.backends import backend_limits
    from .runtime.checkpoint import Checkpoint
    from .runtime.image import mode_metadata, save_image
    from .runtime.requests import normalize_request

    ckpt = Checkpoint.open(args.model, family=args.family)  # configs and headers only
    req = normalize_request(ckpt.config, args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                      width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance, **modes)
    backend_limits(backend, ckpt, ckpt.config)  # an engine set's manifest is read before any engine
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    side = ckpt.config.default_size
    controls = cli_control.call_arguments(control, args.height or side, args.width or side, seed)
    with Pipeline.from_pretrained(args.model, backend=backend, family=args.family, **options,
                                  **cli_control.pipeline_option(control)) as pipe:
        if loras:
            modes["loras"] = {pipe.load_lora(f, name=f"{f.stem}-{i}"): s for i, (f, s) in enumerate(loras)}
        out = pipe(
            args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance, height=args.height, width=args.width,
            generator=torch.Generator().manual_seed(seed), progress=not args.quiet, **modes, **controls,
        )
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "seed": seed,
            "steps": out.info["steps"], "guidance": out.info["guidance"], "model": str(args.model),
            "variant": out.info["variant"], "backend": out.info["backend"],
            "size": f"{out.info['width']}x{out.info['height']}", **mode_metadata(req.mode, req.strength, req.slg),
            **({"loras": ",".join(f"{f.name}:{s:g}" for f, s in loras)} if loras else {})}
    path = save_image(out.images[0], args.out, meta, quality=args.quality)
    print(f"wrote {path} ({out.info['width']}x{out.info['height']}, seed {seed}, "
          f"{out.info['steps']} steps, guidance {out.info['guidance']}, backend {out.info['backend']})")
    return 0


def _mode_arguments(args: argparse.Namespace) -> dict:
    """The Pipeline arguments of --sampler, --image/--mask/--strength and --slg (checked by the
    runtime's normalize_request, whose messages name these flags)."""
    from PIL import Image

    modes: dict = {"sampler": args.sampler}
    if args.mask is not None and args.image is None:
        raise UsageError("--mask needs --image (inpainting repaints the white part of the mask in that image)")
    if args.strength is not None and args.image is None:
        raise UsageError("--strength applies to --image (image-to-image / inpainting); drop it or add --image")
    for flag, path, key, mode in (("--image", args.image, "image", "RGB"), ("--mask", args.mask, "mask_image", "L")):
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                modes[key] = im.convert(mode)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{flag} {path}: not a readable image ({exc}); pass a PNG, JPEG or WebP file") from None
    if args.strength is not None:
        modes["strength"] = args.strength
    if args.slg:
        try:
            modes["skip_guidance_layers"] = [int(b) for b in args.slg.split(",")]
        except ValueError:
            raise UsageError(f"--slg {args.slg!r}: pass transformer block numbers, e.g. 7,8,9") from None
    return modes


def _export(args: argparse.Namespace) -> int:
    info = check.inspect_model(args.model)
    if info.kind in ("export", "engines"):
        raise UsageError(f"--model {args.model} holds exported graphs or engines, not weights; export from the "
                         f"checkpoint it was made from: --model {info.source}")
    if args.out.resolve() == args.model.resolve():
        raise UsageError(f"--out {args.out} is the checkpoint itself; write the export to a folder of its own")
    if args.controlnet:
        cli_control.check_folder(args.controlnet)
    quiet_onnxruntime(not args.verbose)

    from .export.calibrate import CalibSettings
    from .export.exporter import ExportOptions, export_model, format_table

    calib = CalibSettings(num_prompts=args.calib_size, steps=args.calib_steps, seed=args.calib_seed)
    dtype = {"dtype": args.dtype} if args.dtype else {}
    loras = tuple((str(f), s) for f, s in resolve_loras(args.lora, None))
    opts = ExportOptions(precision=args.precision, calib=calib, t5=not args.no_t5, loras=loras,
                         controlnet=str(args.controlnet) if args.controlnet else None, **dtype)
    t0 = time.perf_counter()
    with library_stdout(not args.verbose):  # ModelOpt's and polygraphy's prints
        rows = export_model(args.model, args.out, opts, progress=not args.quiet)
    print(format_table(rows))
    print(f"export to {args.out}: {time.perf_counter() - t0:.1f}s "
          f"({sum(r.status == 'exported' for r in rows)} exported, {sum(r.status == 'cached' for r in rows)} unchanged)")
    return 0


def _refit(args: argparse.Namespace) -> int:
    from .export.refit import refit_engines

    done = refit_engines(args.engines, args.onnx)
    print(f"refit {', '.join(done) or 'nothing (every engine matches its graph)'} in {args.engines}")
    return 0


def _batch_range(text: str) -> tuple[int, int]:
    """"1" -> (1, 1), "1-4" -> (1, 4)."""
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: use N or MIN-MAX, e.g. 1 or 1-4") from None


def _build(args: argparse.Namespace) -> int:
    if args.flavor == "torch-fp8":
        return build_torch(args)
    refuse_scope(args)
    if args.onnx is None:
        raise UsageError(f"--flavor {args.flavor} builds from an exported folder: pass --onnx ONNX_DIR")
    info = check.inspect_model(args.onnx, flag="--onnx")
    if info.kind != "export":
        raise UsageError(f"--onnx {args.onnx} is not an `sd35trt export` folder; export first: sd35trt export "
                         f"--model {info.source if info.kind == 'engines' else args.onnx} --out ONNX_DIR")

    from .export.engines import build_engines, default_out_dir, format_table

    def progress(comp: str, action: str) -> None:
        if not args.quiet:
            print(f"{'building' if action == 'build' else 'up to date'}: {comp}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out = args.out or default_out_dir(args.onnx, args.gpu, family=args.family)
    rows = build_engines(args.onnx, out, gpu=args.gpu, flavor=args.flavor, family=args.family, dynamic=args.dynamic,
                         batch=args.batch, min_size=args.min_size, max_size=args.max_size, opt_level=args.opt_level,
                         refit=args.refit, weight_streaming=args.weight_streaming, timing_cache=args.timing_cache,
                         on_component=progress)
    print(format_table(rows))
    print(f"engines for {args.gpu} ({args.flavor}) in {out}: {time.perf_counter() - t0:.1f}s "
          f"({sum(r.status == 'built' for r in rows)} built, {sum(r.status == 'unchanged' for r in rows)} unchanged)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .cli_serve import serve

    return serve(args)


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line naming the flag, exit status 2 (argparse's), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `sd35trt -v generate` and `sd35trt generate -v` both work (the subcommand keeps the top's value)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="library logs, third-party warnings and tracebacks (hidden by default)")


def _backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=check.BACKENDS, help="default: what the model path holds (torch for a "
                   "checkpoint, onnxruntime for an export folder, an engine set's flavor)")
    p.add_argument("--device", type=check.device, help="cpu, cuda, cuda:N (torch backends; default cuda if available)")
    p.add_argument("--calibration", help="torch-fp8: the FP8 scales, the calibration/ folder of an "
                                         "`sd35trt export --precision fp8` output (or that output folder)")
    p.add_argument("--compile", choices=check.COMPILE_MODES,
                   help="torch-fp8: torch.compile the MMDiT and VAE (default mode, or reduce-overhead: CUDA graphs)")
    p.add_argument("--slots", type=check.int_at_least(1),
                   help="tensorrt/tensorrt-rtx: requests run at the same time, each with its own contexts")
    p.add_argument("--weight-streaming-budget", type=check.int_at_least(0), metavar="BYTES",
                   help="tensorrt/tensorrt-rtx: GPU memory for weights of engines built with --weight-streaming")
    p.add_argument("--memory", choices=check.MEMORY_MODES, help="default: every weight stays on the GPU; balanced: "
                   "text encoders leave it between requests; low: one stage at a time, tiled VAE (torch backends)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sd35trt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="library logs, third-party warnings and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    pos, seed = check.int_at_least(1), check.seed

    t = sub.add_parser("tiny-model", help="write a tiny deterministic SD3.5 checkpoint")
    t.add_argument("out_dir", type=Path)
    t.add_argument("--family", choices=FAMILIES, default="medium")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--corpus", type=Path, help="prompt file for tokenizer training (default calib_prompts/prompts.txt)")
    t.add_argument("--layout", choices=("diffusers", "single-file"), default="diffusers",
                   help="diffusers folder, or sd3.5_*.safetensors + clip_l/clip_g/t5xxl_fp16 + tokenizer*/")
    t.set_defaults(func=_tiny_model)

    e = sub.add_parser("export", help="FP8-calibrate the MMDiT and export every component to ONNX")
    e.add_argument("--model", type=Path, required=True, help="SD3.5 diffusers folder or single-file checkpoint")
    e.add_argument("--out", type=Path, required=True, help="output folder (ONNX + manifest.json)")
    e.add_argument("--precision", choices=("fp8", "bf16", "fp16", "fp32"), default="fp8")
    e.add_argument("--dtype", choices=DTYPES, help="precision of everything not in FP8 (default fp16)")
    e.add_argument("--calib-size", type=pos, default=8, help="calibration prompts (first N of calib_prompts/)")
    e.add_argument("--calib-steps", type=pos, help="denoising steps per calibration prompt (default: the family's)")
    e.add_argument("--calib-seed", type=seed, default=0)
    e.add_argument("--no-t5", action="store_true", help="skip T5 (the runtime then uses zeros, as SD3 allows)")
    e.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse this LoRA (.safetensors) at SCALE (default 1.0) before calibration; repeatable, "
                        "recorded in the manifest")
    e.add_argument("--controlnet", type=Path, help="also export this ControlNet (folder or Stability file; FP8: "
                                                   "calibrated with the MMDiT) and give the transformer its residual input")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_export)

    add_bench_parser(sub)

    b = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an exported ONNX folder")
    b.add_argument("--onnx", type=Path, help="folder written by `sd35trt export` (TensorRT flavors)")
    b.add_argument("--model", type=Path, help="checkpoint (--flavor torch-fp8)")
    b.add_argument("--calibration", help="FP8 calibration dir of `sd35trt export --precision fp8` (--flavor torch-fp8)")
    b.add_argument("--out", type=Path, help="engine folder (default engines/<preset or custom-family>-<precision>-<gpu>)")
    b.add_argument("--gpu", type=check.gpu, required=True,
                   help="target compute capability: sm80, sm86, sm89, sm90, sm100, sm120, ...")
    b.add_argument("--flavor", choices=("tensorrt-rtx", "tensorrt", "torch-fp8"), default="tensorrt-rtx",
                   help="tensorrt-rtx builds on any machine (CPU AOT); tensorrt and torch-fp8 build on the target GPU")
    shape = b.add_mutually_exclusive_group()
    shape.add_argument("--static", dest="dynamic", action="store_false", help="the model's default size (default)")
    shape.add_argument("--dynamic", dest="dynamic", action="store_true",
                       help="sizes --min-size..--max-size (default half to 1.5x the default size: 512-1536)")
    b.add_argument("--batch", type=_batch_range, default=(1, 1), help="images per request: N or MIN-MAX (CFG doubles it)")
    b.add_argument("--min-size", type=pos, help="smallest side in pixels (--dynamic)")
    b.add_argument("--max-size", type=pos, help="largest side in pixels (--dynamic)")
    b.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5",
                   help="builder optimization level 0-5 (library default 3)")
    b.add_argument("--refit", action="store_true", help="refittable engines (enterprise TensorRT)")
    b.add_argument("--weight-streaming", action="store_true", help="engines that can stream weights from host memory")
    b.add_argument("--timing-cache", type=Path, help="timing cache file to reuse and update (enterprise TensorRT)")
    b.add_argument("--family", choices=FAMILIES, help="override the exported family (Turbo: no CFG batch)")
    add_scope_flag(b)
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_build, dynamic=False)

    r = sub.add_parser("refit", help="enterprise TensorRT: swap a re-export's weights (other --lora) into "
                                     "refittable engines (never executed here)")
    r.add_argument("--engines", type=Path, required=True, help="engine set built with --flavor tensorrt --refit")
    r.add_argument("--onnx", type=Path, required=True, help="the new `sd35trt export` folder (same model)")
    r.set_defaults(func=_refit)

    g = sub.add_parser("generate", help="generate one image (PNG, JPEG or WebP by the --out extension)")
    g.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    g.add_argument("--prompt", type=check.prompt, required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=pos, help="default: the family's (Large 28, Medium 40, Turbo 4)")
    g.add_argument("--guidance", type=check.guidance, help="default: the family's (3.5, 4.5, 0.0)")
    g.add_argument("--seed", type=seed, help="default: random (printed and stored in the image)")
    g.add_argument("--height", type=pos, help="pixels, a multiple of 16 (default: the model's)")
    g.add_argument("--width", type=pos, help="pixels, a multiple of 16 (default: the model's)")
    _backend_flags(g)
    g.add_argument("--family", choices=FAMILIES, help="override the detected family")
    g.add_argument("--dtype", choices=DTYPES, help="torch backends (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--quality", type=check.percent, help="JPEG/WebP quality 0-100 (default 95)")
    g.add_argument("--sampler", default="euler", choices=check.SAMPLERS, help="default: euler")
    g.add_argument("--image", type=Path, help="image-to-image from this image (with --mask: inpainting)")
    g.add_argument("--mask", type=Path, help="inpainting mask: white = repaint, black = keep (the image's size)")
    g.add_argument("--strength", type=float, help="--image: how much to change it, (0, 1] (default 0.6)")
    g.add_argument("--slg", help="skip-layer guidance: transformer blocks to skip, e.g. 7,8,9 (SD3.5 Medium)")
    g.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="NAME_OR_FILE[:SCALE]",
                   help="torch backends: a LoRA .safetensors (or its name in --lora-dir) at SCALE (default 1.0); "
                        "repeatable")
    g.add_argument("--lora-dir", type=Path, help="folder that --lora names are looked up in")
    cli_control.add_flags(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", type=check.image_path, required=True,
                   help="image path: .png, .jpg/.jpeg or .webp (the format; metadata in PNG text chunks or EXIF)")
    g.set_defaults(func=_generate)

    v = sub.add_parser("serve", help="HTTP server, OpenAI Images API: POST /v1/images/generations, GET /v1/models")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help=MODEL_HELP)
    src.add_argument("--engines", type=Path, help="engine set from `sd35trt build` (backend: its flavor)")
    _backend_flags(v)
    v.add_argument("--model-id", help="the name GET /v1/models lists and requests pass as model "
                                      "(default: the variant's, e.g. sd3.5-large)")
    v.add_argument("--model-alias", action="append", default=[], help="another name accepted as model (repeatable)")
    v.add_argument("--controlnet", type=cli_control.named_path, action="append", default=[], metavar="NAME=PATH",
                   help="a ControlNet to load at start, requests pick it by NAME (repeatable)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=check.port, default=8000, help="0 picks a free port (printed)")
    v.add_argument("--max-batch", type=pos, default=4, help="images per pipeline call (capped by an engine set)")
    v.add_argument("--batch-window-ms", type=check.non_negative_float, default=10.0,
                   help="how long a request waits for batch-mates")
    v.add_argument("--max-queue", type=pos, default=64, help="waiting requests beyond which the server answers 429")
    v.add_argument("--workers", type=pos, default=1, help="batches generated at the same time, one thread each")
    v.add_argument("--intra-op-threads", type=pos, help="onnxruntime: threads per component (on a CPU, "
                                                        "--workers 2 --intra-op-threads 1 serves 2 cores best)")
    v.add_argument("--timeout-s", type=check.positive_float, default=300.0,
                   help="per request, queue wait + generation (504 after)")
    v.add_argument("--max-size", type=pos, default=2048, help="largest width/height in pixels")
    v.add_argument("--max-steps", type=pos, default=100)
    v.add_argument("--max-n", type=pos, help="images per request (default and at most: --max-batch)")
    v.add_argument("--max-prompt-chars", type=pos, default=2000)
    v.add_argument("--lora-dir", type=Path, help="torch backends: load every *.safetensors LoRA in this folder; "
                                                 "requests pick them by name (GET /v1/loras)")
    add_ray_flags(v)
    v.set_defaults(func=_serve)
    for sp in sub.choices.values():
        _common(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Known failures print one line (`sd35trt CMD: error: ...`, the value and
    the fix) and exit 2; an unexpected one prints its type and message in one line and exits 1
    (`--verbose` shows the traceback); Ctrl-C exits 130."""
    from .runtime.errors import Sd35Error

    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = f"sd35trt {args.command}"
    try:
        with third_party_quiet(not args.verbose):
            return args.func(args)
    except KeyboardInterrupt:
        kept = (f"; the components finished so far are kept in {args.out}: run the same command again to do "
                f"the rest") if args.command in ("export", "build") and getattr(args, "out", None) else ""
        print(f"{name}: interrupted{kept}", file=sys.stderr)
        return INTERRUPTED
    except (Sd35Error, FileExistsError) as exc:
        print(f"{name}: error: {flagged(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{name}: error: {type(exc).__name__}: {text} (run again with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
