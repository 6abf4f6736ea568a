"""`sd35trt build --flavor torch-fp8 --model CKPT --calibration DIR --gpu sm90`: the torch-fp8 engine
set (export/torch_engines.py), checked here before torch is imported."""

from __future__ import annotations

import argparse
import sys
import time

from . import cli_checks as check
from .cli_checks import UsageError


COMPILE_SCOPES = ("model", "blocks")  # runtime/backends/torch_fp8_set.py's (no torch import here)


def add_scope_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES,
                        help="--flavor torch-fp8: compile the MMDiT as one graph (default, the faster step) or "
                             "per joint block (blocks: a faster build and first image, a few ms slower step)")


def refuse_scope(args: argparse.Namespace) -> None:
    """--compile-scope on a TensorRT flavor: refused before any work."""
    if getattr(args, "compile_scope", None) is not None:
        raise UsageError(f"--compile-scope {args.compile_scope} applies to --flavor torch-fp8 (how torch compiles "
                         f"the MMDiT); TensorRT builds the whole graph: drop it for --flavor {args.flavor}")


def build_torch(args: argparse.Namespace) -> int:
    if args.model is None or args.onnx is not None:
        raise UsageError("--flavor torch-fp8 builds from the checkpoint: pass --model CKPT --calibration DIR "
                         "(the calibration/ of `sd35trt export --precision fp8`), not --onnx")
    info = check.inspect_model(args.model, family=args.family)
    if info.kind not in ("diffusers", "single-file"):
        raise UsageError(f"--model {args.model} is {info.kind} output, not a checkpoint; pass the SD3.5 checkpoint "
                         f"it came from ({info.source})")
    calibration = check.calibration_dir(args.calibration, "torch-fp8")
    ignored = [f for f, on in (("--dynamic", args.dynamic), ("--refit", args.refit), ("--weight-streaming",
               args.weight_streaming), ("--timing-cache", args.timing_cache), ("--opt-level", args.opt_level is not None),
               ("--batch", tuple(args.batch) != (1, 1))) if on]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} apply to TensorRT builds; a torch-fp8 set is static, one image per "
                         f"call (other shapes compile on first use): drop them")
    import torch

    from .export.torch_engines import build_from_checkpoint

    if not torch.cuda.is_available():
        raise UsageError(f"--flavor torch-fp8 compiles on the GPU the set is for ({args.gpu}), and none is visible "
                         f"here; run the build on that machine")
    t0 = time.perf_counter()
    out, m = build_from_checkpoint(args.model, calibration, args.out, gpu=args.gpu, family=args.family,
                                   compile_scope=args.compile_scope or "model")
    size = sum(e.bytes for e in m.components.values()) / 2**30
    if not args.quiet:
        print(f"torch-fp8 set for {args.gpu} in {out}: {size:.2f} GiB, {time.perf_counter() - t0:.1f}s "
              f"(timings {m.components['compile_cache'].flags['timings']})", file=sys.stderr)
    print(out)
    return 0
