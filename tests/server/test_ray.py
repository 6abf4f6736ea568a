"""`sd35trt serve --ray` on 127.0.0.1 (a subprocess: a Ray instance of its own, 2 CPU replicas of the
tiny ONNX export): the HTTP contract through the ingress, a replica SIGKILLed under load with no
request lost, 503 with no ready replica, nothing listening beyond 127.0.0.1, nothing left behind.

The tests of this module share one server and run in file order (the last one stops it).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import GENERATIONS, SMALL, metric, wait_until
from PIL import Image

pytest.importorskip("ray", reason="pip install 'sd35trt[ray]' (in the test extra) runs Ray Serve")

from ray_harness import LOOPBACK, RayServer, alive  # noqa: E402
from test_server import BAD  # noqa: E402  (the single-process server's table of bad requests)
from test_server import _raw_post  # noqa: E402
from test_server import test_bad_input_gets_400_naming_the_field as check_bad  # noqa: E402

from sd35trt.runtime import Pipeline  # noqa: E402

REQUESTS, CONCURRENCY, KILL_AFTER = 100, 8, 30


@pytest.fixture(scope="module")
def ray_server(onnx_fp32: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = RayServer(onnx_fp32, 2, tmp_path_factory.mktemp("ray") / "serve.log")
    srv.started, srv.cpu0 = time.monotonic(), time.process_time()
    try:
        srv.ready_s = srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()
        srv.kill()


@pytest.fixture(scope="module")
def reference(onnx_fp32: Path) -> Pipeline:
    """The local pipeline the replicas load (one ONNX Runtime thread per component, as theirs)."""
    pipe = Pipeline.from_pretrained(onnx_fp32, backend="onnxruntime", intra_op_threads=1)
    yield pipe
    pipe.close()


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("case,body,field,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_through_ray_gets_the_single_process_answer(ray_server: RayServer, server, case, body, field,
                                                              code, fragment) -> None:
    with httpx.Client(base_url=ray_server.url, timeout=60) as c:
        check_bad(c, case, body, field, code, fragment)  # the table's checks, through the Ray ingress
        single = httpx.Client(base_url=server.url, timeout=60)
        send = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
                else {"json": {**SMALL, **body} if "size" not in body else body})
        via_ray, alone = c.post(GENERATIONS, **send), single.post(GENERATIONS, **send)
        single.close()
    assert (via_ray.status_code, via_ray.json()) == (alone.status_code, alone.json())


def test_a_client_that_leaves_cancels_its_job_on_the_replica(ray_server: RayServer) -> None:
    with httpx.Client(base_url=ray_server.url, timeout=60) as c:
        gone_before = metric(c, "sd35trt_requests_total", status="499")
        cancelled_before = metric(c, "sd35trt_jobs_total", outcome="cancelled")
        slow = _raw_post(ray_server.url, {"prompt": "slow", "size": "64x64", "steps": 500})  # ~15 s of work
        time.sleep(4.0)  # on a replica by now (2 s was not always enough on 2 loaded cores)
        slow.close()
        wait_until(lambda: metric(c, "sd35trt_requests_total", status="499") == gone_before + 1, timeout_s=60,
                   what="499 counted")

        def replicas_counted_it() -> bool:  # the replicas' counters reach the ingress with their answers
            for i in range(4):
                assert c.post(GENERATIONS, json={"prompt": f"after {i}", **SMALL}).status_code == 200
            return metric(c, "sd35trt_jobs_total", outcome="cancelled") == cancelled_before + 1

        wait_until(replicas_counted_it, timeout_s=30, what="the replica stopped the job")


async def _when_busy(pid: int, timeout_s: float = 10.0) -> None:
    """Return once process `pid` used CPU over a 50 ms window (it is generating: jobs in flight), or
    after `timeout_s`. Killing it straight after one of its answers could find it between batches."""
    def ticks() -> int:  # user + system clock ticks so far (/proc/PID/stat fields 14, 15)
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = ticks()
        await asyncio.sleep(0.05)
        if ticks() - before >= 2:  # >= 2 clock ticks (20 ms of CPU) in 50 ms
            return


async def _load(srv: RayServer) -> tuple[dict[int, httpx.Response], int, list]:
    """REQUESTS requests (seed 1000 + i), CONCURRENCY at a time; after the KILL_AFTER-th answer one
    model replica is SIGKILLed. Returns the answers by i, the killed pid, the listeners before the kill."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(REQUESTS):
        todo.put_nowait(i)
    answers: dict[int, httpx.Response] = {}
    killed: list[int] = []
    listening: list = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            i = todo.get_nowait()
            answers[i] = await client.post(GENERATIONS, json={"prompt": f"ray prompt {i % 5}", "seed": 1000 + i, **SMALL})
            if len(answers) % 10 == 0:
                srv.tree()  # CPU time so far
            if len(answers) >= KILL_AFTER and not killed:
                listening.extend(srv.listeners())  # every port is open by now
                killed.append(srv.replicas()[0])
                await _when_busy(killed[0])  # the answer that got here may have left the victim idle
                os.kill(killed[0], signal.SIGKILL)

    async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        await asyncio.wait_for(asyncio.gather(*(client_loop(c) for _ in range(CONCURRENCY))), 150)
    return answers, killed[0], listening


def test_100_requests_survive_a_replica_kill(ray_server: RayServer, reference: Pipeline, capsys) -> None:
    srv = ray_server
    assert len(srv.replicas()) == 2
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        ok_before, retries_before = metric(c, "sd35trt_requests_total", status="200"), metric(c, "sd35trt_replica_retries_total")
        t0 = time.perf_counter()
        answers, killed, listening = asyncio.run(_load(srv))
        seconds = time.perf_counter() - t0
        assert sorted(answers) == list(range(REQUESTS))  # every request answered
        assert [answers[i].status_code for i in range(REQUESTS)] == [200] * REQUESTS, \
            [(i, r.status_code, r.text[:200]) for i, r in answers.items() if r.status_code != 200]
        assert not alive(killed)
        retries = metric(c, "sd35trt_replica_retries_total") - retries_before
        assert retries >= 1  # requests were in flight on the killed replica and went to the other
        assert metric(c, "sd35trt_requests_total", status="200") - ok_before == REQUESTS
        assert metric(c, "sd35trt_ready") == 1.0
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["backend"] == "onnxruntime"
    assert len(listening) >= 8 and all(addr.rsplit(":", 1)[0] in LOOPBACK for addr, _ in listening), listening
    for i in range(REQUESTS):  # each image is the local pipeline's for its seed
        prompt, seed = f"ray prompt {i % 5}", 1000 + i
        want = reference(prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                         output_type="pil", progress=False).images[0]
        assert answers[i].headers["x-seed"] == str(seed)
        assert np.array_equal(_image(answers[i].content), np.asarray(want)), f"request {i} (seed {seed})"
    with capsys.disabled():
        print(f"\n[ray: {REQUESTS} requests, {CONCURRENCY} at a time, 2 CPU replicas, one SIGKILLed after the "
              f"{KILL_AFTER}th answer: {seconds:.1f} s, {REQUESTS / seconds:.1f} req/s, {retries:.0f} sent again; "
              f"{len(listening)} listening sockets, all on loopback]")


def test_no_ready_replica_answers_503(ray_server: RayServer) -> None:
    for pid in ray_server.replicas():
        os.kill(pid, signal.SIGKILL)
    with httpx.Client(base_url=ray_server.url, timeout=60) as c:
        wait_until(lambda: c.get("/readyz").status_code == 503, timeout_s=15, what="readyz 503")
        r = c.post(GENERATIONS, json={"prompt": "nobody home", **SMALL})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "no model replica" in r.json()["error"]["message"] and r.json()["error"]["type"] == "unavailable"
        assert c.get("/healthz").status_code == 200 and metric(c, "sd35trt_ready") == 0.0


def _ps_pids() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 2) for line in out.splitlines())
    return {int(r[0]): r[2] if len(r) > 2 else "" for r in rows if not r[1].startswith("Z")}


def test_stopping_leaves_no_ray_process(ray_server: RayServer, capsys) -> None:
    seen = set(ray_server.tree()) | ray_server.seen
    assert len(seen) >= 8  # the command, GCS, raylet, agents, controller, proxy, ingress, replicas
    code, stop_s = ray_server.stop()
    assert code == 0, ray_server.log.read_text()[-2000:]
    wait_until(lambda: not seen & set(_ps_pids()), timeout_s=15, what="every Ray process gone")
    wall = time.monotonic() - ray_server.started
    with capsys.disabled():
        print(f"\n[ray server: ready in {ray_server.ready_s:.0f} s, stopped in {stop_s:.0f} s, {wall:.0f} s in all; "
              f"CPU time of its {len(seen)} processes {ray_server.cpu_s():.0f} s, of this test process "
              f"{time.process_time() - ray_server.cpu0:.0f} s]")


async def _timed_load(url: str, requests: int) -> tuple[list[int], float]:
    """`requests` requests, CONCURRENCY at a time: (statuses, seconds)."""
    todo = list(range(requests))
    statuses: list[int] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            r = await client.post(GENERATIONS, json={"prompt": f"throughput {i % 5}", "seed": i, **SMALL})
            statuses.append(r.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(c) for _ in range(CONCURRENCY))), 240)
        return statuses, time.perf_counter() - t0


def _measure(url: str, tree: RayServer | None = None) -> tuple[float, float, float]:
    """(req/s, seconds, CPU seconds of the Ray server's processes) of 64 requests after 8 to warm up."""
    asyncio.run(_timed_load(url, CONCURRENCY))  # warm-up: every replica has run
    cpu0 = tree.cpu_s() if tree is not None and tree.tree() else 0.0
    statuses, seconds = asyncio.run(_timed_load(url, 64))
    cpu = tree.cpu_s() - cpu0 if tree is not None and tree.tree() else float("nan")
    assert statuses == [200] * 64
    return 64 / seconds, seconds, cpu


@pytest.mark.slow
def test_throughput_two_replicas_vs_one(onnx_fp32: Path, tmp_path: Path, capsys) -> None:
    """The same load (64 requests, 8 at a time, after 8 to warm up) on 1 and then 2 CPU replicas of one
    ONNX Runtime thread each (both share this machine's cores), and on the single-process server with
    the same batcher and thread settings as the peer (recorded in BENCHMARKS.md)."""
    from harness import settings

    from sd35trt.server import BackgroundServer, create_app

    rates = {}
    app = create_app(settings(onnx_fp32, backend_options={"intra_op_threads": 1}))
    with BackgroundServer(app) as peer:
        wait_until(lambda: httpx.get(peer.url + "/readyz").status_code == 200, timeout_s=120, what="peer ready")
        rates["single process"] = _measure(peer.url)
    for replicas in (1, 2):
        srv = RayServer(onnx_fp32, replicas, tmp_path / f"serve-{replicas}.log")
        try:
            srv.wait_ready(timeout_s=400)  # slow: the start is not what this test measures
            rates[f"ray, {replicas} replica(s)"] = _measure(srv.url, srv)
        finally:
            srv.stop()
            srv.kill()
    with capsys.disabled():
        for name, (rate, seconds, cpu) in rates.items():
            print(f"\n[throughput, {name}: {rate:.2f} req/s (64 requests in {seconds:.1f} s, {cpu:.1f} CPU s in "
                  f"the Ray server's processes)]", end="")
        two, one = rates["ray, 2 replica(s)"][0], rates["ray, 1 replica(s)"][0]
        print(f"\n[throughput: ray 2 replicas / 1 = {two / one:.2f}x, ray 1 replica / single process = "
              f"{one / rates['single process'][0]:.2f}x; {os.cpu_count()} cores shared by all]")
