"""`sd35trt serve`: everything checked before the port is bound, then the server in the foreground.

The model path, the backend and every limit are checked first (a bad flag or a missing folder is
one line and exit status 2, nothing bound); the model then loads in the background (/healthz at
once, /readyz 200 when loaded). If it fails to load, the server stops and the command exits 1 with
the error in one line (an embedded server, `create_app` + `BackgroundServer`, stays up instead and
reports the failure on /readyz).
"""

from __future__ import annotations

import argparse
import sys

from . import cli_checks as check
from . import cli_control
from .cli_checks import UsageError
from .cli_ray import check_flags as check_ray_flags
from .cli_ray import serve_ray
from .quiet import quiet_onnxruntime


def serve(args: argparse.Namespace) -> int:
    on_ray = check_ray_flags(args)
    path, flag = (args.engines, "--engines") if args.engines is not None else (args.model, "--model")
    info = check.inspect_model(path, flag=flag)  # before any heavy import: a wrong path answers at once
    if args.engines is not None and info.kind != "engines":
        raise UsageError(f"--engines {path} is not an engine set (no engine manifest); serve it with --model, or "
                         f"build one with `sd35trt build --onnx EXPORT_DIR --gpu smXX`")
    backend = check.check_backend(info, args.backend, flag)
    options = check.backend_options(args, backend, info.kind)
    try:
        from .server import Limits, ServeSettings, bind, create_app, run
    except ImportError as exc:
        raise UsageError(f"{exc.name or exc} is missing; pip install 'sd35trt[serve]'") from None
    limits = Limits(max_size=args.max_size, max_steps=args.max_steps, max_n=args.max_n,
                    max_prompt_chars=args.max_prompt_chars, timeout_s=args.timeout_s)
    settings = ServeSettings(model=path, backend=backend, engines=args.engines is not None, backend_options=options,
                             max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                             workers=args.workers, limits=limits, model_id=args.model_id,
                             model_aliases=tuple(args.model_alias), lora_dir=args.lora_dir,
                             controlnets=cli_control.serve_controlnets(args.controlnet))
    if args.lora_dir is not None:
        from .server.loras import lora_files

        if backend not in ("torch", "torch-fp8"):
            raise UsageError(f"--lora-dir needs a torch backend (torch, torch-fp8); {backend!r} runs exported "
                             f"graphs: fuse LoRAs at export (`sd35trt export --lora FILE[:SCALE]`)")
        lora_files(args.lora_dir)  # a missing folder is refused before binding
    check.require_cuda(options, backend)
    quiet_onnxruntime(backend == "onnxruntime" and not args.verbose)

    from .runtime.backends import backend_limits
    from .runtime.checkpoint import Checkpoint

    ckpt = Checkpoint.open(path)  # configs and headers: a broken folder is refused before binding
    backend_limits(backend, ckpt, ckpt.config)
    if on_ray:
        return serve_ray(args, settings)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({exc}); pick another --port") from None
    print(f"sd35trt serve: http://{args.host}:{sock.getsockname()[1]} (model {settings.model}; "
          f"GET /readyz turns 200 once it is loaded)", flush=True)
    app = create_app(settings)
    run(app, sock, log_level="info" if args.verbose else "warning", exit_on_load_failure=True)
    host = app.state.host
    if host.status == "failed":
        print(f"sd35trt serve: error: {check.flagged(host.describe())}", file=sys.stderr)
        return 1
    return 0
