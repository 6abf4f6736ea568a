"""The HTTP API on Ray Serve (`pip install 'sd35trt[ray]'`): `sd35trt serve --ray` runs it on this
machine; `build_app` is the application for `serve run` / `serve deploy` configs
(`import_path: sd35trt.server.ray:build_app`, `args:` the settings below).

Two deployments: `Ingress` serves the same FastAPI app as `sd35trt serve` (`create_app` over a
`RemoteHost`: routes, schema, errors, metrics unchanged) and `Model`, whose replicas each hold one
`Pipeline` with its `MicroBatcher` (a `ModelHost`, as the single-process server). The micro-batcher,
not `@serve.batch`, batches inside a replica: it groups requests by everything that shapes the
computation (size, steps, sampler, guidance), gives image i of a job the generator of seed + i
(so each image equals its unbatched twin), stops cancelled jobs mid-run and reruns an out-of-memory
batch one job at a time; `@serve.batch` would batch any requests together and do none of that.

A replica is healthy while its pipeline is ready (Serve's health check calls `require_ready`); a
replica that fails to load does not start. Replicas: a fixed count, or autoscaling between MIN and
MAX on Serve's count of ongoing requests per replica (`target_queue`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from ray import serve

from ..runtime.batching import Job

from .app import create_app
from .remote import MODEL, BackendInfo, RemoteHost, RemoteModel, Reply, RetryMetrics
from .scaling import Scaling, settings_from_args
from .state import ModelHost, ServeSettings

APP = "sd35trt"
HEALTH_CHECK_S = 2.0


def keep_on_loopback() -> None:
    """On a Ray node whose address is the loopback one (`sd35trt serve --ray`), make this replica's
    inter-deployment gRPC server listen there too: Serve 2.60 binds it to every interface
    ("[::]:0", ray/serve/_private/replica.py), the one port of the instance that would be
    reachable from elsewhere. Called in the replica's constructor, before Serve starts that server."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return  # a cluster node: Ray's own addresses are the machine's, so are Serve's
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "sd35trt_loopback", False):
        return

    def loopback(server: Any, address: str) -> int:
        return bind(server, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    loopback.sd35trt_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


def _gpus(scaling: Scaling) -> float:
    if scaling.gpus_per_replica is not None:
        return scaling.gpus_per_replica
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


class Model:
    """One replica: a pipeline and its micro-batcher (`ModelHost`), loaded before the replica runs."""

    def __init__(self, settings: ServeSettings) -> None:
        import time

        keep_on_loopback()
        self.host = ModelHost(settings)
        self.host.start()
        while self.host.status == "loading":
            time.sleep(0.05)
        self.host.require_ready()  # a load failure fails the replica with the host's message
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id if context is not None else "local"

    async def generate(self, job: Job) -> Reply:
        pipe, batcher = self.host.require_ready()
        try:
            out, error = await batcher.generate(job), None
        except Exception as exc:
            out, error = None, exc
        return Reply(out, error, batcher.stats(), self.name)

    def info(self) -> RemoteModel:
        pipe, batcher = self.host.require_ready()
        return RemoteModel(pipe.config, BackendInfo(pipe.backend.name, pipe.backend.limits), batcher.max_batch,
                           tuple(pipe.loras), tuple(pipe.lora_info()))

    def check_health(self) -> None:
        self.host.require_ready()

    def __del__(self) -> None:
        self.host.close()


def _replicas_of(app_name: str):
    def count() -> tuple[int, str]:
        deployment = serve.status().applications[app_name].deployments[MODEL]
        running = int(deployment.replica_states.get("RUNNING", 0))
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(deployment.replica_states.items())) or "none yet"
        message = deployment.message.strip().splitlines()[-1] if deployment.message.strip() else ""
        return running, f"replicas: {states}; deployment {deployment.status.lower()}" + (f": {message}" if message else "")

    return count


@serve.ingress()
class Ingress:
    """The HTTP API: `create_app` over the model deployment."""

    def __init__(self, model: Any, settings: ServeSettings) -> None:
        keep_on_loopback()
        self.model, self.settings = model, settings

    def __serve_build_asgi_app__(self):
        context = serve.get_replica_context()
        host = RemoteHost(self.settings, self.model, _replicas_of(context.app_name if context else APP))
        app = create_app(self.settings, host=host)
        app.state.metrics.registry.register(RetryMetrics(host))
        return app


def build_app(settings: ServeSettings | Mapping[str, Any], scaling: Scaling | None = None) -> serve.Application:
    """The Serve application. From a `serve` config, `settings` is the `args:` mapping: the
    ServeSettings fields (model, backend, backend_options, max_batch, batch_window_ms, max_queue,
    workers, model_id, model_aliases), the Limits fields (max_size, max_steps, max_n,
    max_prompt_chars, timeout_s) and the Scaling fields (replicas, autoscale: "MIN-MAX",
    target_queue, gpus_per_replica, cpus_per_replica)."""
    if not isinstance(settings, ServeSettings):
        settings, scaling = settings_from_args(settings)
    scaling = scaling or Scaling()
    # A replica takes one running batch per worker and one forming; more wait in the ingress's router
    # (up to max_queue, then 429), so a replica's own queue never refuses what Serve sends it.
    ongoing = 2 * settings.max_batch * settings.workers
    model_settings = replace(settings, max_queue=max(settings.max_queue, ongoing))
    if scaling.autoscale is not None:
        lo, hi = scaling.autoscale
        count: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": scaling.target_queue or settings.max_batch}}
    else:
        count = {"num_replicas": scaling.replicas}
    model = serve.deployment(Model, name=MODEL).options(
        ray_actor_options={"num_cpus": scaling.cpus_per_replica, "num_gpus": _gpus(scaling)},
        max_ongoing_requests=ongoing, max_queued_requests=settings.max_queue,
        health_check_period_s=HEALTH_CHECK_S, graceful_shutdown_timeout_s=settings.limits.timeout_s, **count)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(model.bind(model_settings), settings)
