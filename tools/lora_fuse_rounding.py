"""Why fuse=True loses fidelity on the FP8 MMDiT, emulated on CPU at SD3.5 Large widths.

  python tools/lora_fuse_rounding.py

One Linear (random N(0, 0.02) weights, a rank-r LoRA with |BA| ~ 0.3 |W| as tools/lora_bench.py
makes, 1024 token rows with a few outlier channels, per-tensor E4M3 activations): output cosine vs
the exact x (W + BA)ᵀ for the side path (E4M3 W + exact BA), fuse=True as the runtime does it
(E4M3 W dequantized, BA added, re-quantized per tensor), the same re-quantized per output channel,
the old weight scale kept, and a single rounding of W + BA from the bf16 weights. The fused error
is the second rounding (weight error x sqrt 2), not the scale's granularity.
"""

import torch

E4M3 = torch.float8_e4m3fn


def q(t: torch.Tensor, scale) -> torch.Tensor:
    """t rounded to E4M3 at `scale` (per tensor, or a column [N, 1] per output channel), dequantized."""
    return (t / scale).clamp(-448, 448).to(E4M3).float() * scale


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main() -> None:
    torch.manual_seed(0)
    for k, n, r in ((2432, 2432, 64), (2432, 9728, 64), (9728, 2432, 16)):
        w = torch.randn(n, k) * 0.02  # [N, K]
        d = (torch.randn(n, r) * (0.3 / r ** 0.5)) @ (torch.randn(r, k) * 0.02)  # B A: [N, K]
        x = torch.randn(1024, k)  # [M, K]
        x[:, :8] *= 20  # a few outlier channels
        xq = q(x, float(x.abs().max()) / 448)
        ref = x @ (w + d).T  # [M, N]
        sw = float(w.abs().max()) / 448
        wq = q(w, sw)
        wf = wq + d  # what fuse_delta re-quantizes: the E4M3 W, dequantized, plus BA
        weights = {"fuse per-tensor (runtime)": q(wf, float(wf.abs().max()) / 448),
                   "fuse per-channel": q(wf, wf.abs().amax(1, keepdim=True) / 448),
                   "fuse, old scale kept": q(wf, sw),
                   "one rounding from bf16 W": q(w + d, float((w + d).abs().max()) / 448)}
        row = [f"side path {cos(xq @ wq.T + x @ d.T, ref):.6f}"]
        for name, wt in weights.items():
            err = float((wt - w - d).norm() / (w + d).norm())
            row.append(f"{name} {cos(xq @ wt.T, ref):.6f} (weight rel err {err:.4f})")
        print(f"K={k} N={n} rank {r}: " + "; ".join(row))


if __name__ == "__main__":
    main()
