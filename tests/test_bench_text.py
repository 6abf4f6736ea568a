"""`sd35trt bench --configs text` on the CPU (`--tiny`): every configuration timed in the same rounds,
ours converted and compiled by the backend's own functions, held-out cosines against the peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow  # the CPU's torch._scaled_mm is a slow reference: ~2 min
def test_text_bench_rows(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from sd35trt.bench import Runner
    from sd35trt.bench_text import PEER, bench_text

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: threads only contend
    try:
        runner = Runner(tmp_path / "text.json")
        bench_text(runner, tokenizers=tiny_models["large"], tiny=True, compile_args={"backend": "aot_eager"})
    finally:
        torch.set_num_threads(threads)
    rows = {r["name"]: r for r in json.loads((tmp_path / "text.json").read_text())}
    assert list(rows)[0] == PEER and len(rows) == 4 and rows[PEER]["time_vs_peer"] == 1.0
    compiled = next(r for n, r in rows.items() if "compiled" in n)
    assert compiled["compile_s"] > 0 and compiled["calls"] == 2
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["weights_gib"] >= 0
        if name != PEER:  # FP8 T5 on tiny random widths: close to the peer, not equal
            assert len(r["held_out_cos"]) == 3 and 0.999 < min(r["t5_part_cos"]) and 0.999 < min(r["held_out_cos"])
