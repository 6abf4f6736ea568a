"""`sd35trt serve --ray`: the same HTTP API on Ray Serve, on a Ray instance of this machine.

Every Ray process of that instance (GCS, raylet, workers, agents) listens on 127.0.0.1 only:
Ray picks its node address before it starts, and with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that
address is the loopback one (a `_node_ip_address="127.0.0.1"` alone is turned into the machine's
own address). The dashboard is off; `--host` is where Serve's HTTP proxy listens (default
127.0.0.1). SIGINT/SIGTERM: Serve drains (requests in progress finish), then the instance stops
with every process it started. For a cluster of several machines, deploy `sd35trt.server.ray:
build_app` with a `serve` config instead (README).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from . import cli_checks as check
from .cli_checks import UsageError

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # single-node Ray: its node address is 127.0.0.1
WATCH_S = 1.0


def autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) and int(hi) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} must be MIN-MAX replicas with MIN <= MAX, e.g. 1-4")
    return int(lo), int(hi)


def add_flags(v: argparse.ArgumentParser) -> None:
    """The `serve` flags of the Ray path."""
    g = v.add_argument_group("Ray Serve (pip install 'sd35trt[ray]')")
    g.add_argument("--ray", action="store_true", help="serve on Ray Serve: an ingress and model replicas, each "
                                                      "one pipeline with its micro-batcher")
    count = g.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=check.int_at_least(1), help="--ray: model replicas (default 1)")
    count.add_argument("--autoscale", type=autoscale, metavar="MIN-MAX", help="--ray: scale the replicas between "
                       "MIN and MAX on --target-queue requests per replica")
    g.add_argument("--target-queue", type=check.positive_float, help="--ray --autoscale: ongoing requests per "
                   "replica to scale on (default: --max-batch)")
    g.add_argument("--gpus-per-replica", type=check.non_negative_float,
                   help="--ray: GPUs each replica holds (default 1 with CUDA, 0 on a CPU)")


def check_flags(args: argparse.Namespace) -> bool:
    """Whether to serve on Ray; UsageError for a Ray flag that does not fit (before any import)."""
    given = [f for f, v in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                            ("--target-queue", args.target_queue), ("--gpus-per-replica", args.gpus_per_replica))
             if v is not None]
    if not args.ray and given:
        raise UsageError(f"{given[0]} needs --ray (it sets Ray Serve's model replicas)")
    if args.target_queue is not None and args.autoscale is None:
        raise UsageError("--target-queue needs --autoscale MIN-MAX (a fixed --replicas count does not scale)")
    return bool(args.ray)


def _port(host: str, port: int) -> int:
    """`port`, checked free on `host` (0: a free one), before Ray starts; Serve's proxy binds it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
        return s.getsockname()[1]


def _app_failure(app_name: str) -> str | None:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is not None and app.status == "DEPLOY_FAILED":
        return app.message.strip().splitlines()[-1] if app.message.strip() else "the application failed to deploy"
    return None


def serve_ray(args: argparse.Namespace, settings) -> int:
    """Start a loopback Ray instance, deploy the app, serve until SIGINT/SIGTERM."""
    from .server.scaling import Scaling

    scale = Scaling(replicas=args.replicas or 1, autoscale=args.autoscale, target_queue=args.target_queue,
                    gpus_per_replica=args.gpus_per_replica)
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise UsageError("ray was imported before `serve --ray` could keep it on 127.0.0.1; run it as its own process")
    os.environ.update(LOOPBACK_ENV)  # this process is the command's own: Ray reads it at import
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise UsageError(f"{exc.name or exc} is missing; pip install 'sd35trt[ray]'") from None

    from .server.ray import APP, build_app

    port = _port(args.host, args.port)
    needed = (scale.autoscale[1] if scale.autoscale else scale.replicas) * scale.cpus_per_replica
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
             log_to_driver=args.verbose, logging_level="INFO" if args.verbose else "WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port}, proxy_location="HeadOnly")
        serve.run_many([serve.RunTarget(build_app(settings, scale), name=APP, route_prefix="/")],
                       wait_for_applications_running=False)
        where = f"{scale.autoscale[0]}-{scale.autoscale[1]} replicas" if scale.autoscale else f"{scale.replicas} replica(s)"
        print(f"sd35trt serve --ray: http://{args.host}:{port} ({where} of {settings.model}; GET /readyz turns 200 "
              f"once one is loaded)", flush=True)
        while not stop.wait(WATCH_S):
            failure = _app_failure(APP)
            if failure:
                print(f"sd35trt serve: error: the model replicas failed to start: {check.flagged(failure)}",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        serve.shutdown()  # requests in progress finish first
        ray.shutdown()  # and every process this instance started stops
