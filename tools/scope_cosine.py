"""Does compiling the MMDiT per joint block change its numbers against one whole-step graph?
On the CPU, inductor, a tiny checkpoint's MMDiT in bf16, one CFG-batch step:
`python tools/scope_cosine.py TINY_MODEL [out.json]` prints the velocity cosines of eager, scope
"model" and scope "blocks" against each other (and the traced graphs per scope)."""

import json
import sys
import time
from pathlib import Path

import torch

from sd35trt.runtime.backends.torch_fp8_set import compile_mmdit
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.models.loader import load_modules


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return round(float(a @ b / (a.norm() * b.norm())), 7)


def main() -> None:
    from torch._dynamo.utils import counters

    ckpt = Checkpoint.open(sys.argv[1])
    config = ckpt.config
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(config.latent_shape(2, 64, 64), generator=g).bfloat16(), torch.full((2,), 300.0),  # [2, 16, 8, 8], [2]
            torch.randn(2, config.text_tokens(), config.joint_dim, generator=g).bfloat16(),  # [2, 77+T, joint]
            torch.randn(2, config.pooled_dim, generator=g).bfloat16())  # [2, pooled]
    out, row = {}, {}
    for scope in ("eager", "model", "blocks"):
        mmdit = load_modules(ckpt, ["transformer"], torch.device("cpu"), torch.bfloat16)["transformer"]
        torch._dynamo.reset()
        counters.clear()
        t = time.perf_counter()
        with torch.no_grad():
            fn = mmdit if scope == "eager" else compile_mmdit(mmdit, scope, backend="inductor")
            out[scope] = fn(*args).float()
        row[scope] = {"first_call_s": round(time.perf_counter() - t, 1), "graphs": counters["stats"]["unique_graphs"]}
    row["cosine"] = {"model_vs_eager": cos(out["model"], out["eager"]), "blocks_vs_eager": cos(out["blocks"], out["eager"]),
                     "blocks_vs_model": cos(out["blocks"], out["model"])}
    row["max_abs_blocks_vs_model"] = float((out["blocks"] - out["model"]).abs().max())
    print(json.dumps(row))
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
