"""A server whose ONNX Runtime sessions draw from a CPU arena capped at LIMIT_MB (run as a script
by test_runner.py, in its own process: the allocator is registered on this process's ONNX Runtime
environment). A large request then really runs out of memory inside ONNX Runtime.

    python oom_server.py ONNX_DIR LIMIT_MB      # prints "port N", serves until SIGTERM
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort


def main(onnx_dir: str, limit_mb: str) -> None:
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(int(limit_mb) << 20, -1, -1, -1))

    from sd35trt.server import Limits, ServeSettings, bind, create_app, run

    settings = ServeSettings(model=Path(onnx_dir), backend="onnxruntime",
                             backend_options={"session_config": {"session.use_env_allocators": "1"}},
                             limits=Limits(max_size=512, max_steps=10, timeout_s=60))
    sock = bind("127.0.0.1", 0)
    print(f"port {sock.getsockname()[1]}", flush=True)
    run(create_app(settings), sock, log_level="warning")


if __name__ == "__main__":
    main(*sys.argv[1:])
