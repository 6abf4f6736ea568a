"""The FastAPI app: POST /v1/images/generations and /v1/images/edits (OpenAI's Images API; edits:
server/edits.py), GET /v1/models, /v1/models/{id}, /healthz, /readyz, /metrics.

Status codes and error bodies follow OpenAI's (`{"error": {"message", "type", "param", "code"}}`),
so the official clients raise their typed errors: 400 `invalid_request_error` (body not JSON, a
field wrong or out of limits, an unknown model; `param` names the field); 404 an unknown model id
under /v1/models; 429 the queue is full; 503 not ready (loading, failed to load, shutting down) or
out of memory on this request; 504 the request outlived --timeout-s; 500 the generation failed
(the message says why); 499 (logged only) the client went away and its generation was cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..runtime import Pipeline, PipelineOutput
from ..runtime.batching import Job, Ticket
from ..runtime.errors import (ClosedError, InvalidInputError, NonFiniteLatentsError, QueueFullError,
                                    is_out_of_memory)
from ..runtime.image import MEDIA_TYPES, encode_image, mode_metadata

from .edits import EDITS, auto_size, edit_inputs, read_edit
from .fields import field_error
from .metrics import CONTENT_TYPE, Metrics, RequestMetrics
from .loras import describe as describe_loras
from .loras import with_loras
from .schema import FieldError, GenerationRequest, Rendering, check_model, describe_validation, rendering, to_job
from .state import ModelHost, ServeSettings

log = logging.getLogger(__name__)
GENERATIONS = "/v1/images/generations"
POLL_S = 0.05  # how often a waiting request checks for a client that went away


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


def error(status: int, message: str, kind: str, field: str | None = None, headers: dict | None = None,
          code: str | None = None) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"message": message, "type": kind, "param": field, "code": code or kind}
    return JSONResponse({"error": body}, status, headers=headers)


def error_response(exc: BaseException, timeout_s: float) -> JSONResponse:
    """A typed error -> its HTTP answer (the message always says what to change)."""
    if isinstance(exc, FieldError):
        return error(400, str(exc), "invalid_request_error", exc.field, code=exc.code)
    if isinstance(exc, InvalidInputError):
        return error(400, str(exc), "invalid_request_error", code="invalid_value")
    if isinstance(exc, QueueFullError):
        return error(429, str(exc), "queue_full", headers={"Retry-After": "1"}, code="rate_limit_exceeded")
    if isinstance(exc, ClosedError):
        return error(503, str(exc), "unavailable", headers={"Retry-After": "5"})
    if is_out_of_memory(exc):
        return error(503, f"out of memory while generating: {exc}", "out_of_memory")
    if isinstance(exc, RequestTimeout):
        return error(504, f"the request took longer than the server's timeout of {timeout_s:g} s (queue wait + "
                          f"generation); ask for fewer steps or a smaller size, or raise --timeout-s", "timeout")
    if isinstance(exc, ClientGone):
        return error(499, "the client closed the connection; the generation was cancelled", "cancelled")
    if isinstance(exc, NonFiniteLatentsError):
        return error(500, f"generation failed: {exc}", "generation_error")
    log.error("generation failed: %s: %s", type(exc).__name__, exc)
    return error(500, f"generation failed: {type(exc).__name__}: {exc}", "generation_error")


async def wait_for_result(ticket: Ticket, request: Request, timeout_s: float) -> PipelineOutput:
    """The ticket's output; cancels the job on timeout, client disconnect or task cancellation."""
    loop = asyncio.get_running_loop()
    future, deadline = asyncio.wrap_future(ticket.future), loop.time() + timeout_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimeout()
            done, _ = await asyncio.wait({future}, timeout=min(POLL_S, remaining))
            if done:
                return future.result()
            if await request.is_disconnected():
                raise ClientGone()
    except BaseException:
        if not ticket.future.done():
            ticket.cancel()
        raise


def render(how: Rendering, job: Job, out: PipelineOutput, model: str) -> Response:
    """The raw image (one) or OpenAI's JSON `{"created", "data": [{"b64_json", "seed"}], ...}`, in
    PNG / JPEG / WebP with the same metadata as `sd35trt generate`."""
    info = out.info
    meta = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "steps": info["steps"],
            "guidance": info["guidance"], "size": f"{info['width']}x{info['height']}", "model": model,
            "variant": info["variant"], "backend": info["backend"],
            **mode_metadata(info["mode"], job.strength, job.skip_layer_guidance)}
    images = [encode_image(img, how.fmt, {**meta, "seed": job.seed + i}, how.quality) for i, img in enumerate(out.images)]
    if how.raw:
        headers = {"X-Seed": str(job.seed), "X-Batch-Images": str(info["batch_images"])}
        return Response(images[0], media_type=MEDIA_TYPES[how.fmt], headers=headers)
    data = [{"b64_json": base64.b64encode(b).decode("ascii"), "seed": job.seed + i} for i, b in enumerate(images)]
    summary = {k: meta[k] for k in ("steps", "guidance", "size", "variant", "backend", "mode", "strength", "slg")
               if k in meta}
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": how.fmt, "size": meta["size"],
                         "background": "opaque", "info": {**summary, "batch_images": info["batch_images"]}})


def create_app(settings: ServeSettings, pipeline: Pipeline | None = None, host: ModelHost | None = None) -> FastAPI:
    """The server app. With `pipeline`, serve that (already loaded) pipeline and leave it open at
    shutdown; otherwise load `settings.model` in the background at startup and close it at shutdown.
    `host`: serve another host with ModelHost's interface instead (the Ray app's `RemoteHost`)."""
    host = host if host is not None else ModelHost(settings, pipeline)
    mode = lambda: getattr(getattr(host.pipe, "memory", None), "mode", None) or settings.backend_options.get(  # noqa: E731
        "memory", "default")
    metrics = Metrics(host.stats, lambda: host.ready, lambda: host.max_batch, gpu=torch.cuda.is_available(),
                      memory_mode=mode)
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()
        yield
        await run_in_threadpool(host.close)  # queued and running jobs finish first

    app = FastAPI(title="sd35trt", summary="Stable Diffusion 3.5 image generation", lifespan=lifespan)
    app.state.host, app.state.metrics = host, metrics
    app.add_middleware(RequestMetrics, metrics=metrics, paths=(GENERATIONS, EDITS))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, code, message = describe_validation(list(exc.errors()))
        return error(400, message, "invalid_request_error", field, code=code)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body: dict[str, Any] = {"status": host.status, "model": str(settings.model)}
        if host.ready and host.pipe is not None:
            body.update(backend=host.pipe.backend.name, variant=host.pipe.config.name, max_batch=host.max_batch)
            return JSONResponse(body)
        return JSONResponse({**body, "error": host.describe()}, 503)

    def model_card() -> dict[str, Any]:
        return {"id": host.model_id, "object": "model", "created": host.created, "owned_by": "sd35trt"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        if host.model_id is None:
            return error(503, host.describe(), "unavailable", headers={"Retry-After": "5"})
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        if host.model_id is None:
            return error(503, host.describe(), "unavailable", headers={"Retry-After": "5"})
        if name != host.model_id and name not in host.model_names():
            return error(404, f"model {name!r} is not served here; this server serves {host.model_id!r}",
                         "invalid_request_error", "model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/v1/loras")
    async def loras() -> JSONResponse:
        return JSONResponse(describe_loras(host.pipe if host.ready else None))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def answer(body: GenerationRequest, request: Request, **edit: Any) -> Response:
        """Check the request against the limits and the model, queue it, render its images."""
        pipe, batcher = host.require_ready()
        check_model(body.model, host.model_id, host.model_names())
        how = rendering(body, request.headers.get("accept"))
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        caps = pipe.backend.limits
        sizes = (caps.min_size or 0, caps.max_size or limits.max_size) if caps.max_size else None
        job = with_loras(to_job(body, limits, pipe.config, seed, sizes, raw=how.raw,
                                controlnets=settings.controlnet_names, **edit),
                         body.loras, pipe.loras, settings.lora_limits)
        try:
            ticket = batcher.submit(job)
        except InvalidInputError as exc:  # the Pipeline's own check: name the field it came from
            raise field_error(exc) from exc
        out = await wait_for_result(ticket, request, limits.timeout_s)
        return await run_in_threadpool(render, how, job, out, str(settings.model))

    @app.post(GENERATIONS, response_model=None)
    async def generations(body: GenerationRequest, request: Request) -> Response:
        try:
            return await answer(body, request)
        except Exception as exc:
            return error_response(exc, limits.timeout_s)

    @app.post(EDITS, response_model=None)
    async def edits(request: Request) -> Response:
        try:
            host.require_ready()
            edit = await read_edit(request, limits)
            inputs = await run_in_threadpool(edit_inputs, edit, limits)
            body = edit.body
            if body.size in (None, "auto"):
                body = body.model_copy(update={"size": auto_size(inputs["image"])})
            return await answer(body, request, **inputs)
        except Exception as exc:
            return error_response(exc, limits.timeout_s)

    return app
