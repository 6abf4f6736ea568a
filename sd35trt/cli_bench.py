"""`sd35trt bench`: its flags and its dispatch to the benchmark parts (sd35trt/bench*.py). The GPU
work is imported only when the command runs, so `--help` and bad flags answer without torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import cli_checks as check
from .cli_checks import UsageError


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_transformer

    configs = args.configs.split(",")
    control = [c for c in configs if c.partition(":")[0] == "control"]
    configs = [c for c in configs if c not in control]
    if control:
        from .bench import fp8_config
        from .bench_control import DEFAULT_CONFIG

        for c in control:  # a bad name fails before any part runs
            fp8_config(c.partition(":")[2] or DEFAULT_CONFIG)
    if set(configs) - {"e2e", "text", "modes"}:
        bench_transformer(args.preset, args.size, args.batch, configs, args.attention, args.json, args.fidelity)
    if "e2e" in configs and args.memory:
        bad = sorted(set(args.memory.split(",")) - set(check.MEMORY_MODES))
        if bad:
            raise UsageError(f"--memory {args.memory}: {bad} not among {list(check.MEMORY_MODES)}")
        from .bench_memory import bench_memory

        configs = [c for c in configs if c != "e2e"]
        bench_memory(args.preset, args.size, args.steps, args.memory.split(","), t5=not args.no_t5,
                     repeats=args.memory_repeats, out=args.json.with_name(f"{args.json.stem}_memory.json"))
    for part in [c for c in ("text", "e2e", "modes") if c in configs]:
        from .bench import Runner
        from .bench_e2e import bench_e2e
        from .bench_text import bench_text
        from .bench_modes import bench_modes

        runner = Runner(args.json.with_name(f"{args.json.stem}_{part}.json"))
        if part == "modes":
            bench_modes(args.preset, args.size, args.steps, args.strength, runner)
        else:
            if part == "text":
                bench_text(runner, args.preset, tokenizers=args.tokenizers, tiny=args.tiny)
            else:
                bench_e2e(args.preset, args.size, args.steps, runner)
        print(runner.table(runner.rows[0]["name"]))
    for c in control:  # ControlNet step: peer and ours in one run (sd35trt/bench_control.py)
        from .bench_control import bench_control

        bench_control(args.preset, args.size, args.batch, args.json.with_name(f"{args.json.stem}_control.json"),
                      c.partition(":")[2] or DEFAULT_CONFIG, args.attention)
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="time the diffusers peer and our backends on one GPU, one run")
    b.add_argument("--preset", choices=("sd3.5-large", "sd3.5-medium"), default="sd3.5-large",
                   help="released shapes with random weights")
    b.add_argument("--size", type=int, default=1024)
    b.add_argument("--batch", type=int, default=1, help="images per step (the transformer sees 2x: CFG)")
    b.add_argument("--steps", type=int, default=28, help="denoising steps of the end-to-end image (e2e, modes)")
    b.add_argument("--strength", type=float, default=0.6, help="image-to-image / inpainting strength (modes)")
    b.add_argument("--configs", default="peer-eager,peer-compile,bf16,fp8,fp8-compile-default",
                   help="comma list: attention, vae, peer-eager, peer-compile, bf16, peer-ao, fp8[-compile-<mode>][+fast][+gelu][+tune][+mk][+fa4][+quack], profile, text, e2e, modes (image-to-image / inpainting / SLG), control[:<fp8 config>] (one step with a "
                        "released-size ControlNet vs diffusers' eager BF16; default fp8 config: the runtime's)")
    b.add_argument("--fidelity", action="store_true",
                   help="compare every FP8 row with BF16 (cosine, rel. L2) even without a peer/bf16 row; "
                        "e2e rows always compare the final image (cosine, PSNR)")
    b.add_argument("--attention", choices=("default", "cudnn", "flash"), default="cudnn",
                   help="SDPA backend for our configs (the peer keeps diffusers' default)")
    b.add_argument("--memory", help="e2e: memory modes to compare, comma list in this order: default,balanced,low "
                                    "(peak GPU memory and seconds per image on a repeated and a new prompt)")
    b.add_argument("--no-t5", action="store_true", help="--memory: run without T5-XXL (zeros, as SD3 allows)")
    b.add_argument("--memory-repeats", type=int, default=2, metavar="N",
                   help="--memory: images timed per mode and prompt kind after the first (0: the first image only, "
                        "a new prompt through every stage: the peak, no time ratios)")
    b.add_argument("--tokenizers", type=Path, metavar="CKPT",
                   help="text: tokenize calib_prompts/ with this checkpoint's tokenizers (T5 calibrated over the first "
                        "16 pairs, context cosine on the last 3); default: seeded random token ids")
    b.add_argument("--tiny", action="store_true",
                   help="text: tiny encoder widths on the CPU (checks the bench itself; its figures mean nothing)")
    b.add_argument("--json", type=Path, default=Path("bench.json"))
    b.set_defaults(func=_bench)
