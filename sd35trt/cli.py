"""The `sd35trt` command line: tiny-model, generate (export, build, bench and serve follow)."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _tiny_model(args: argparse.Namespace) -> int:
    import tempfile

    from sd35trt.export.single_file import write_single_file
    from sd35trt.export.tiny_model import read_corpus, write_tiny_model

    corpus = read_corpus(args.corpus) if args.corpus else None
    t0 = time.perf_counter()
    if args.layout == "diffusers":
        out = write_tiny_model(args.out_dir, variant=args.variant, seed=args.seed, corpus=corpus)
    else:  # built as a diffusers folder in a temporary place, then converted
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise FileExistsError(f"{args.out_dir} exists and is not empty; remove it or pick another OUT_DIR")
        args.out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{args.out_dir.name}.", dir=args.out_dir.parent) as tmp:
            folder = write_tiny_model(Path(tmp) / "diffusers", variant=args.variant, seed=args.seed, corpus=corpus)
            out = write_single_file(folder, args.out_dir).parent
    print(f"wrote tiny SD3.5 {args.variant} checkpoint ({args.layout} layout, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from sd35trt.runtime import Pipeline
    from sd35trt.runtime.image import save_png

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    options = {"device": args.device} if args.device else {}
    if args.dtype:
        options["dtype"] = getattr(torch, args.dtype)
    with Pipeline.from_pretrained(args.model, backend=args.backend, variant=args.variant, **options) as pipe:
        out = pipe(
            args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance, height=args.height, width=args.width,
            generator=torch.Generator().manual_seed(seed), progress=not args.quiet,
        )
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or "", "seed": seed,
            "steps": out.info["steps"], "guidance": out.info["guidance"], "model": str(args.model),
            "variant": out.info["variant"], "backend": out.info["backend"],
            "size": f"{out.info['width']}x{out.info['height']}"}
    path = save_png(out.images[0], args.out, meta)
    print(f"wrote {path} ({out.info['width']}x{out.info['height']}, seed {seed}, "
          f"{out.info['steps']} steps, guidance {out.info['guidance']}, backend {out.info['backend']})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from sd35trt.export.calibrate import CalibSettings
    from sd35trt.export.exporter import ExportOptions, export_model, format_table

    calib = CalibSettings(num_prompts=args.calib_size, steps=args.calib_steps, seed=args.calib_seed)
    dtype = args.dtype or ("fp32" if args.precision in ("fp8", "fp32") else args.precision)
    opts = ExportOptions(precision=args.precision, dtype=dtype, calib=calib, t5=not args.no_t5)
    t0 = time.perf_counter()
    rows = export_model(args.model, args.out, opts, progress=not args.quiet)
    print(format_table(rows))
    print(f"export to {args.out}: {time.perf_counter() - t0:.1f}s "
          f"({sum(r.status == 'exported' for r in rows)} exported, {sum(r.status == 'cached' for r in rows)} unchanged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd35trt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="write a tiny deterministic SD3.5 checkpoint")
    t.add_argument("out_dir", type=Path)
    t.add_argument("--variant", choices=("medium", "large", "turbo"), default="medium")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corpus", type=Path, help="prompt file for tokenizer training (default calib_prompts/prompts.txt)")
    t.add_argument("--layout", choices=("diffusers", "single-file"), default="diffusers",
                   help="diffusers folder, or sd3.5_*.safetensors + clip_l/clip_g/t5xxl_fp16 + tokenizer*/")
    t.set_defaults(func=_tiny_model)

    e = sub.add_parser("export", help="FP8-calibrate the MMDiT and export every component to ONNX")
    e.add_argument("--model", type=Path, required=True, help="SD3.5 diffusers folder")
    e.add_argument("--out", type=Path, required=True, help="output folder (ONNX + manifest.json)")
    e.add_argument("--precision", choices=("fp8", "bf16", "fp16", "fp32"), default="fp8")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="precision of everything not in FP8 (default fp32; fp16 for real-size engines)")
    e.add_argument("--calib-size", type=int, default=8, help="calibration prompts (first N of calib_prompts/)")
    e.add_argument("--calib-steps", type=int, help="denoising steps per calibration prompt (default: variant's)")
    e.add_argument("--calib-seed", type=int, default=0)
    e.add_argument("--no-t5", action="store_true", help="skip T5 (the runtime then uses zeros, as SD3 allows)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate one image to a PNG")
    g.add_argument("--model", type=Path, required=True, help="SD3.5 diffusers folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=int, help="default: the variant's (Large 28, Medium 40, Turbo 4)")
    g.add_argument("--guidance", type=float, help="default: the variant's (3.5, 4.5, 0.0)")
    g.add_argument("--seed", type=int, help="default: random (printed and stored in the PNG)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--backend", default="torch")
    g.add_argument("--variant", choices=("large", "medium", "large-turbo"), help="override the detected family")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--out", type=Path, required=True, help="PNG path")
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    from sd35trt.runtime.errors import Sd35Error

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (Sd35Error, FileExistsError) as exc:
        print(f"sd35trt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
