"""`sd35trt serve --ray`'s flags fail as every flag does: one line naming it, exit status 2, in well
under 3 s, nothing started (the server itself: tests/server/test_ray.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_cli_errors import LIMIT_S, _lines, _run, paths  # noqa: F401  (paths: the fixture)


def _serve(p: dict[str, Path], *extra: str) -> list:
    return ["serve", "--model", p["onnx"], "--port", "0", *extra]


BAD_RAY_FLAGS = [
    ("replicas without --ray", lambda p: _serve(p, "--replicas", "2"), "--replicas needs --ray"),
    ("gpus per replica without --ray", lambda p: _serve(p, "--gpus-per-replica", "1"), "--gpus-per-replica"),
    ("replicas 0", lambda p: _serve(p, "--ray", "--replicas", "0"), "--replicas"),
    ("autoscale backwards", lambda p: _serve(p, "--ray", "--autoscale", "4-1"), "--autoscale"),
    ("autoscale not a range", lambda p: _serve(p, "--ray", "--autoscale", "many"), "--autoscale"),
    ("replicas and autoscale", lambda p: _serve(p, "--ray", "--replicas", "2", "--autoscale", "1-2"), "--autoscale"),
    ("target queue without autoscale", lambda p: _serve(p, "--ray", "--target-queue", "4"), "--target-queue needs"),
    ("gpus per replica negative", lambda p: _serve(p, "--ray", "--gpus-per-replica", "-1"), "--gpus-per-replica"),
    ("ray with a missing model", lambda p: ["serve", "--ray", "--model", p["tmp"] / "nope"], "--model"),
]


@pytest.mark.parametrize("case,argv,flag", BAD_RAY_FLAGS, ids=[c[0] for c in BAD_RAY_FLAGS])
def test_a_bad_ray_flag_is_one_line_naming_it(paths: dict[str, Path], case: str, argv, flag: str) -> None:  # noqa: F811
    res, seconds = _run(argv(paths))
    err = _lines(res.stderr)
    assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert err[0].startswith("sd35trt ") and flag in err[0], err[0]
    assert res.stdout == "" and seconds < LIMIT_S, (seconds, err[0])


def test_a_port_in_use_is_refused_before_ray_starts(paths: dict[str, Path]) -> None:  # noqa: F811
    pytest.importorskip("ray", reason="pip install 'sd35trt[ray]' (in the test extra)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res, _ = _run(["serve", "--ray", "--model", paths["onnx"], "--backend", "onnxruntime", "--port", port])
    err = _lines(res.stderr)
    assert res.returncode == 2 and len(err) == 1 and "--port" in err[0] and str(port) in err[0], res.stderr
