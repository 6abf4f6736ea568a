"""GPU probe (issue 18): quack's CuTe-DSL FP8 GEMMs with fused epilogues against what the torch-fp8
step runs now (cuBLAS `torch._scaled_mm`, fast accumulation, bias fused, then an inductor kernel
for the elementwise work), at the SD3.5 Large image-stream shapes (1024², CFG batch 2: M = 8192).

    python3 tools/quack_probe.py OUT.json [--budget-s 230] [--medium] [--cfgs 128x192p,...]

Rows (each timed as CUDA-graph replays of 10 calls, median of 5 replays, ms per call):
* `cublas:<gemm>`           _scaled_mm, bf16 out, for qkv / out / ff1 / ff2
* `quack:<gemm>:<cfg>`      quack `linear_epi` (same math), per tile config, fast or slow accumulation
* `ff1+gelu:cublas`         _scaled_mm + compiled GELU(tanh) + E4M3 quantize (today's FF1)
* `ff1+gelu:quack:<cfg>`    one quack kernel (`gelu_quant_epi`, E4M3 out)
* `qkv+norm:cublas` / `qkv+norm:quack:<cfg>`  the QKV GEMM + q/k RMS-norm: cuBLAS and the compiled
                            norm vs quack `qkv_norm_epi` (fusion `quack-qknorm`)
* `ff2+res:cublas`          _scaled_mm + compiled x += gate*y (today's FF2 and gated residual)
* `ff2+res:quack:<cfg>`     quack `gated_delta_epi` with add_to_output, one call per batch half
Each quack row also gives the cosine of its output against the cuBLAS row's. (The 2026-12-01 run
timed the cuBLAS rows with a copy of their output into a buffer, ~0.02-0.07 ms each: BENCHMARKS.md
says how that changes its ratios; the rows now write in place.) Without quack (or
CUDA) the quack rows say why and the cuBLAS rows still run. The JSON is rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from sd35trt.bench import cosine, graph_ms

E4M3, MAX = torch.float8_e4m3fn, 448.0
M, D, FF = 8192, 2432, 9728  # B*N image tokens at 1024² with CFG; Large hidden; FF inner
GEMMS = {"qkv": (D, 3 * D), "out": (D, D), "ff1": (D, FF), "ff2": (FF, D)}  # name -> (K, N)
DM = 1536  # SD3.5 Medium's hidden width (--medium: its four image-stream GEMMs instead)
MEDIUM = {"qkv": (DM, 3 * DM), "out": (DM, DM), "ff1": (DM, 4 * DM), "ff2": (4 * DM, DM)}
CFGS = {  # name -> quack EpiMod.gemm tile arguments (more to try for Medium: 128x128p, 192x128p)
    "128x256c": dict(tile_M=128, tile_N=256, cluster_M=2, cluster_N=1, pingpong=False),
    "128x192p": dict(tile_M=128, tile_N=192, cluster_M=2, cluster_N=1, pingpong=True),
    "256x128c": dict(tile_M=256, tile_N=128, cluster_M=1, cluster_N=2, pingpong=False),
    "256x192c": dict(tile_M=256, tile_N=192, cluster_M=2, cluster_N=1, pingpong=False),
    "128x128p": dict(tile_M=128, tile_N=128, cluster_M=2, cluster_N=1, pingpong=True),
    "128x160p": dict(tile_M=128, tile_N=160, cluster_M=2, cluster_N=1, pingpong=True),
}
FAST = (("fp8_slow_accum", False),)  # quack's fp8 path promotes every k-tile unless told otherwise


def operands(k: int, n: int, gen: torch.Generator):
    """x_q [M, K] and w_q [N, K] in E4M3 with realistic scales, bias [N] bf16."""
    x = torch.randn(M, k, generator=gen, device="cuda") * 3
    w = torch.randn(n, k, generator=gen, device="cuda") * (1 / math.sqrt(k))
    sx, sw = float(x.abs().max()) / MAX, float(w.abs().max()) / MAX
    xq, wq = (x / sx).to(E4M3), (w / sw).to(E4M3)
    bias = (torch.randn(n, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
    t = lambda v: torch.tensor(v, dtype=torch.float32, device="cuda")  # noqa: E731
    return xq, wq, t(sx), t(sw), t(sx * sw), bias


def gelu(y: torch.Tensor) -> torch.Tensor:  # the runtime's sigmoid form of GELU(tanh)
    y = y.float()
    return y * torch.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))


class Probe:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget, self.t0 = out, budget_s, time.monotonic()
        self.doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "M": M, "rows": []}
        try:
            import quack  # noqa: F401
            from sd35trt.runtime.models import quack_epi
            self.epi = quack_epi
            self.doc["quack"] = getattr(sys.modules["quack"], "__version__", "?")
        except Exception as e:  # noqa: BLE001 - the reason goes into the table
            self.epi, self.doc["quack"] = None, f"not importable: {type(e).__name__}: {e}"
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def row(self, name: str, fn, ref: torch.Tensor | None = None, out_of=None, **extra) -> torch.Tensor | None:
        r = {"name": name, **extra}
        if time.monotonic() - self.t0 > self.budget:
            r["skipped"] = "over budget"
        else:
            t = time.monotonic()
            try:
                r["ms"] = round(graph_ms(fn), 4)
                got = out_of() if out_of else None
                if ref is not None and got is not None:
                    r["cosine"] = round(cosine(got, ref), 6)
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                traceback.print_exc()
                got = None
            r["wall_s"] = round(time.monotonic() - t, 1)
        self.doc["rows"].append(r)
        self.out.write_text(json.dumps(self.doc, indent=1))
        print(json.dumps(r), flush=True)
        return got if "ms" in r else None

    def quack_gemm(self, mod, a, b, d, cfg: str, fast: bool, **kw):
        return mod.gemm(a, b, d, epi_args=kw.pop("epi_args"), post_init_attrs=FAST if fast else (), **CFGS[cfg], **kw)

    def plain(self, name: str, cfgs: list[str]) -> None:
        k, n = GEMMS[name]
        xq, wq, sx, sw, alpha, bias = operands(k, n, self.gen)
        y = torch.empty(M, n, dtype=torch.bfloat16, device="cuda")
        cub = lambda: torch._scaled_mm(xq, wq.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16,  # noqa: E731
                                       use_fast_accum=True, out=y)  # into y: no copy kernel in the row
        ref = self.row(f"cublas:{name}", cub, out_of=lambda: y.clone(), tflops=2 * M * k * n / 1e12)
        if self.epi is None:
            return
        d = torch.empty_like(y)
        b32 = bias.float()[None]  # [1, N] row vector
        for cfg in cfgs:
            for fast in (True, False) if cfg == cfgs[0] else (True,):
                self.row(f"quack:{name}:{cfg}:{'fast' if fast else 'slow'}",
                         lambda: self.quack_gemm(self.epi.linear_epi, xq, wq, d, cfg, fast,
                                                 epi_args=dict(alpha=alpha, bias=b32)),
                         ref=ref, out_of=lambda: d.clone())

    def ff1_gelu(self, cfgs: list[str]) -> None:
        k, n = GEMMS["ff1"]
        xq, wq, sx, sw, alpha, bias = operands(k, n, self.gen)
        probe = torch._scaled_mm(xq, wq.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        s_next = float(gelu(probe).abs().max()) / MAX
        inv = torch.tensor(1 / s_next, dtype=torch.float32, device="cuda")
        quant = torch.compile(lambda y: (gelu(y) * inv).clamp(-MAX, MAX).to(E4M3), fullgraph=True)
        held: list[torch.Tensor] = []  # the output made during graph capture: each replay rewrites it

        def cub():
            held[:] = [quant(torch._scaled_mm(xq, wq.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16,
                                              use_fast_accum=True))]
        ref = self.row("ff1+gelu:cublas", cub, out_of=lambda: held[0].float())
        if self.epi is None:
            return
        d = torch.empty(M, n, dtype=E4M3, device="cuda")
        b32 = bias.float()[None]
        for cfg in cfgs:
            self.row(f"ff1+gelu:quack:{cfg}:fast",
                     lambda: self.quack_gemm(self.epi.gelu_quant_epi, xq, wq, d, cfg, True,
                                             epi_args=dict(alpha=alpha, bias=b32, inv_s=inv)),
                     ref=ref, out_of=lambda: d.float())

    def qkv_norm(self, cfgs: list[str], hd: int = 64) -> None:
        """The fused QKV GEMM + q/k RMS-norm: cuBLAS then the compiled norm vs quack's qkv_norm_epi."""
        from sd35trt.runtime.models.fp8_gemm import qk_norm_ref

        k, n = GEMMS["qkv"]
        xq, wq, sx, sw, alpha, bias = operands(k, n, self.gen)
        d = n // 3
        qk_w = torch.cat([torch.rand(2 * d, generator=self.gen, device="cuda") + 0.5,
                          torch.zeros(d, device="cuda")])[None]  # [1, 3D]
        v_one = torch.cat([torch.zeros(2 * d, device="cuda"), torch.ones(d, device="cuda")])[None]
        norm = torch.compile(lambda y: qk_norm_ref(y, qk_w, v_one, hd), fullgraph=True)
        held: list[torch.Tensor] = []

        def cub():
            held[:] = [norm(torch._scaled_mm(xq, wq.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16,
                                             use_fast_accum=True))]
        ref = self.row("qkv+norm:cublas", cub, out_of=lambda: held[0].float())
        if self.epi is None:
            return
        out = torch.empty(M, n, dtype=torch.bfloat16, device="cuda")
        b32 = bias.float()[None]
        for cfg in cfgs:
            self.row(f"qkv+norm:quack:{cfg}:fast",
                     lambda: self.quack_gemm(self.epi.qkv_norm_epi, xq, wq, out, cfg, True,
                                             epi_args=dict(alpha=alpha, bias=b32, qk_w=qk_w, v_one=v_one, qk=hd)),
                     ref=ref, out_of=lambda: out.float())

    def ff2_residual(self, cfgs: list[str]) -> None:
        k, n = GEMMS["ff2"]
        xq, wq, sx, sw, alpha, bias = operands(k, n, self.gen)
        gate = torch.randn(2, n, generator=self.gen, device="cuda").to(torch.bfloat16)  # [B, N]
        x0 = torch.randn(M, n, generator=self.gen, device="cuda").to(torch.bfloat16)  # residual stream
        x = x0.clone()
        add = torch.compile(lambda x, y: x.view(2, -1, n).add_(gate[:, None] * y.view(2, -1, n)), fullgraph=True)

        def cub():
            add(x, torch._scaled_mm(xq, wq.t(), sx, sw, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True))
        x.copy_(x0)
        ref_once = None
        try:
            cub()
            ref_once = x.clone()
        except Exception:  # noqa: BLE001 - the row below records it
            pass
        self.row("ff2+res:cublas", cub)
        if self.epi is None or ref_once is None:
            return
        b32 = bias.float()[None]
        half = M // 2
        for cfg in cfgs:
            def qk(cfg=cfg):
                for i in range(2):
                    self.quack_gemm(self.epi.gated_delta_epi, xq[i * half:(i + 1) * half], wq, x[i * half:(i + 1) * half],
                                    cfg, True, add_to_output=True,
                                    epi_args=dict(alpha=alpha, bias=b32, gate=gate[i:i + 1].float()))
            x.copy_(x0)
            try:
                qk()
                torch.cuda.synchronize()
                cos = cosine(x - x0, ref_once - x0)
            except Exception as e:  # noqa: BLE001
                cos = f"{type(e).__name__}: {str(e)[:300]}"
            self.row(f"ff2+res:quack:{cfg}:fast", qk, delta_cosine_one_call=cos)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--budget-s", type=float, default=230.0)
    ap.add_argument("--cfgs", default=",".join(CFGS))
    ap.add_argument("--medium", action="store_true", help="Medium's shapes (K, N from 1536 wide), every config on each")
    a = ap.parse_args()
    if a.medium:
        GEMMS.update(MEDIUM)
    torch.backends.cuda.matmul.allow_tf32 = True
    p = Probe(Path(a.out), a.budget_s)
    cfgs = a.cfgs.split(",")
    p.plain("ff1", cfgs)
    p.ff1_gelu(cfgs if a.medium else cfgs[:2])
    p.qkv_norm(cfgs if a.medium else cfgs[:2])
    if not a.medium:
        p.ff2_residual(cfgs[:2])
    for g in ("qkv", "out", "ff2"):
        p.plain(g, cfgs if a.medium else cfgs[:2])
    p.doc["wall_s"] = round(time.monotonic() - p.t0, 1)
    p.out.write_text(json.dumps(p.doc, indent=1))
    print("\n".join(f"{r['name']:<34} {r.get('ms', '-'):>8} ms  cos {r.get('cosine', '')}  {r.get('error', r.get('skipped', ''))[:80]}"
                    for r in p.doc["rows"]))


if __name__ == "__main__":
    main()
