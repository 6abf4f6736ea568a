"""A micro-batcher over ONNX Runtime sessions whose CPU arena is capped at LIMIT_MB (run as a script
by test_batching.py, in its own process: the allocator is registered on this process's ONNX Runtime
environment). Four SIZE×SIZE requests then really run out of memory as one batch and fit alone.

    python oom_batch.py ONNX_DIR LIMIT_MB SIZE     # prints one JSON line
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort


def main(onnx_dir: str, limit_mb: str, size: str) -> None:
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(int(limit_mb) << 20, -1, -1, -1))

    from sd35trt.runtime import Pipeline
    from sd35trt.runtime.batching import Job, MicroBatcher

    pipe = Pipeline.from_pretrained(onnx_dir, backend="onnxruntime",
                                    session_config={"session.use_env_allocators": "1"})
    jobs = [Job(f"request {i}", seed=i, height=int(size), width=int(size), steps=1, output_type="np") for i in range(4)]
    with MicroBatcher(pipe, max_batch=4, window_ms=2000) as batcher:
        tickets = [batcher.submit(j) for j in jobs]
        outs = [t.result(timeout=300).images for t in tickets]
        stats = batcher.stats()
    alone = [pipe(**j.call_kwargs(), progress=False).images for j in jobs]
    diff = max(float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(outs, alone))
    print(json.dumps({"batches": stats.batches, "sizes": stats.batch_sizes, "completed": stats.completed,
                      "failed": stats.failed, "retried_alone": stats.retried_alone, "max_diff": diff}))


if __name__ == "__main__":
    main(*sys.argv[1:])
