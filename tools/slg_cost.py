"""What the transformer graph's skip_layers input costs: the same MMDiT exported with it (every
block's output selected by a Where on its skip flag) and without it (the plain 4-input graph),
timed on ONNX Runtime CPU at one shape; prints both medians and the ratio.

    python tools/slg_cost.py [--family medium] [--size 128] [--batch 2] [--runs 30]

Uses a tiny checkpoint written on the fly (export/tiny_model.py), fp32, ONNX Runtime's default threads;
the two graphs' runs alternate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sd35trt.export.tiny_model import write_tiny_model
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.components import component
from sd35trt.runtime.models.loader import load_modules


class Plain(torch.nn.Module):
    """The MMDiT without the skip input (the graph before it existed)."""

    def __init__(self, mmdit: torch.nn.Module) -> None:
        super().__init__()
        self.mmdit = mmdit

    def forward(self, x, t, ctx, pooled):
        return self.mmdit(x, t, ctx, pooled)


def _export(module: torch.nn.Module, args: tuple, names: list[str], path: Path) -> None:
    spec = component("transformer")
    axes = {k: v for k, v in spec.dynamic_axes().items() if k in names or k == "velocity"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=19, input_names=names,
                          output_names=["velocity"], dynamic_axes=axes, do_constant_folding=True)


def _time(paths: list[Path], feeds: list[dict], runs: int) -> list[float]:
    """Median seconds per graph; the graphs' runs alternate, so a busy machine slows both alike."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="medium")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoint.open(write_tiny_model(Path(tmp) / "tiny", family=a.family, seed=0))
        mmdit = load_modules(ckpt, ["transformer"], torch.device("cpu"), torch.float32)["transformer"]
        spec, g = component("transformer"), torch.Generator().manual_seed(0)
        shapes = spec.shapes(ckpt.config, a.batch, a.size, a.size, 16)
        args = [torch.randn(shapes[n], generator=g) for n in spec.input_names[:-1]]
        args[1] = torch.full((a.batch,), 500.0)  # timestep
        skip = torch.zeros(shapes["skip_layers"])  # [L]: the plain pass, no block skipped
        _export(mmdit, (*args, skip), list(spec.input_names), Path(tmp) / "skip.onnx")
        _export(Plain(mmdit), tuple(args), list(spec.input_names[:-1]), Path(tmp) / "plain.onnx")
        feed = {n: t.numpy() for n, t in zip(spec.input_names, args)}
        plain, with_skip = _time([Path(tmp) / "plain.onnx", Path(tmp) / "skip.onnx"],
                                 [feed, {**feed, "skip_layers": skip.numpy()}], a.runs)
        print(f"{a.family} tiny, {a.size}px, batch {a.batch}, skip_layers[{skip.numel()}]: "
              f"plain {plain * 1e3:.2f} ms, with skip input {with_skip * 1e3:.2f} ms, "
              f"ratio {with_skip / plain:.3f}")


if __name__ == "__main__":
    main()
