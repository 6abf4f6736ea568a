"""Running the server: graceful stop on a thread, `sd35trt serve` on SIGTERM, and a real
out-of-memory inside ONNX Runtime on one request (both in child processes, on 127.0.0.1)."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from harness import GENERATIONS, SMALL, metric, settings, wait_until

from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, create_app


def _post_in_threads(url: str, bodies: list[dict]) -> tuple[list, list[threading.Thread]]:
    out: list = [None] * len(bodies)

    def post(i: int) -> None:
        out[i] = httpx.post(url + GENERATIONS, json=bodies[i], timeout=120)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return out, threads


def test_stop_finishes_running_and_queued_requests(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    app = create_app(settings(onnx_fp32, max_batch=1, batch_window_ms=0), pipeline=ort_pipe)
    srv = BackgroundServer(app).start()
    out, threads = _post_in_threads(srv.url, [{"prompt": f"p{i}", "size": "64x64", "steps": 40} for i in range(3)])
    wait_until(lambda: (app.state.host.stats().running, app.state.host.stats().queue_depth) == (1, 2),
               what="one running, two queued")
    srv.stop()  # returns once all three are answered and the batcher is drained
    for t in threads:
        t.join(60)
    assert [r.status_code for r in out] == [200, 200, 200]
    assert not srv.running and app.state.host.status == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz", timeout=5)
    # a pipeline handed to the app stays open for its owner
    assert ort_pipe("after the server", height=64, width=64, num_inference_steps=1, output_type="np",
                    progress=False).images.shape == (1, 64, 64, 3)


def _spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start a server process; its first stdout line names the port."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "port" not in line and "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}; stderr: {log.read_text()[-2000:]}")
    port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1]) if "http://" in line else int(line.split()[1])
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(client: httpx.Client, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        assert proc.poll() is None, "server process exited"
        return client.get("/readyz").status_code == 200

    wait_until(ready, 120, "readyz 200")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_serve_answers_then_drains_on_sigterm(onnx_fp32: Path, tmp_path: Path) -> None:
    proc, url = _spawn([sys.executable, "-m", "sd35trt", "serve", "--model", str(onnx_fp32), "--backend",
                        "onnxruntime", "--port", "0", "--max-steps", "200"], tmp_path / "stderr.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            _wait_ready(c, proc)
            r = c.post(GENERATIONS, json={"prompt": "from the command line", **SMALL})
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
            out, threads = _post_in_threads(url, [{"prompt": "in flight", "size": "64x64", "steps": 150}])
            wait_until(lambda: metric(c, "sd35trt_running_requests") == 1, what="request in flight")
        proc.send_signal(signal.SIGTERM)
        threads[0].join(60)
        assert out[0].status_code == 200  # the request in flight was finished, not dropped
        # after its graceful shutdown uvicorn re-raises the signal it caught (so: killed by SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)


def test_out_of_memory_in_one_request_is_503_and_the_server_keeps_serving(onnx_fp32: Path, tmp_path: Path) -> None:
    script = Path(__file__).with_name("oom_server.py")
    proc, url = _spawn([sys.executable, str(script), str(onnx_fp32), "48"], tmp_path / "stderr.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            _wait_ready(c, proc)
            small = {"prompt": "a small one", "seed": 1, **SMALL}
            first = c.post(GENERATIONS, json=small)
            assert first.status_code == 200
            big = c.post(GENERATIONS, json={"prompt": "a big one", "size": "512x512", "steps": 1})
            err = big.json()["error"]
            assert big.status_code == 503 and err["type"] == "out_of_memory", err
            assert "out of memory" in err["message"] and ".onnx" in err["message"]
            again = c.post(GENERATIONS, json=small)  # same request after the failure: same image
            assert again.status_code == 200 and again.content == first.content
            assert c.get("/readyz").status_code == 200
            assert metric(c, "sd35trt_requests_total", status="503") == 1
            assert metric(c, "sd35trt_jobs_total", outcome="failed") == 1
        assert _stop(proc) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)


def test_background_server_binds_loopback_by_default(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    with BackgroundServer(create_app(settings(onnx_fp32), pipeline=ort_pipe)) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        assert httpx.get(srv.url + "/healthz", timeout=10).json() == {"status": "ok"}
