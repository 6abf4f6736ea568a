"""Attention cores at SD3.5 shapes on the GPU: speed and error vs an fp32 reference.

Run on the GPU host: `bash tools/gpu_run.sh tools/attention_probe.py $OUT/attention.json`. Compares
torch SDPA bf16 (cuDNN, flash) on heads-first views of [B, N, H, D] tensors (as the MMDiT calls
it) with FlashAttention-4 through our custom op `sd35trt::flash_attn4` (no transposes), when
`flash_attn.cute` imports. Shapes: CFG batch 2, 1024² (4096 image + 333 text tokens), head_dim 64;
SD3.5 Large 38 heads, Medium 24. Softmax peakedness: logits with std 0.5 and 3.
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from sd35trt.bench import time_cuda
from sd35trt.runtime.models.flash_attention import choose_attention, flash_attention
from sd35trt.runtime.models.mmdit import sdpa

rows = []
out_path = sys.argv[1] if len(sys.argv) > 1 else "attention.json"


def fid(y, ref):
    a, b = y.flatten().double(), ref.flatten().double()
    return dict(cos=round(F.cosine_similarity(a, b, dim=0).item(), 6), rel_l2=round(((a - b).norm() / b.norm()).item(), 5))


def record(name, fn, ref, flops, **extra):
    y = fn()
    torch.cuda.synchronize()
    ms = time_cuda(fn, warmup=3, iters=20)
    row = dict(name=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), **fid(y, ref), **extra)
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)


def inputs(b, n, h, d, logit_std, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, n, h, d, generator=g, device="cuda"), dim=-1) * math.sqrt(d) for _ in range(2))
    q, k = q * math.sqrt(logit_std), k * math.sqrt(logit_std)  # q.k/sqrt(d) has std ~ logit_std
    v = torch.randn(b, n, h, d, generator=g, device="cuda")
    return q.bfloat16(), k.bfloat16(), v.bfloat16()  # [B, N, H, D]


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    choice = choose_attention("cuda", torch.bfloat16)
    print("attention choice:", choice.name, choice.reason, flush=True)
    for variant, heads in (("large", 38), ("medium", 24)):
        b, n, d = 2, 4096 + 333, 64
        flops = 4 * b * heads * n * n * d
        for logit_std in (0.5, 3.0):
            q, k, v = inputs(b, n, heads, d, logit_std)
            with sdpa_kernel(SDPBackend.MATH):
                ref = sdpa(q.float(), k.float(), v.float())  # [B, N, H, D] fp32
            tag = dict(variant=variant, logit_std=logit_std)
            for name, be in (("sdpa cudnn bf16", SDPBackend.CUDNN_ATTENTION), ("sdpa flash bf16", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(be):
                    record(name, lambda: sdpa(q, k, v), ref, flops, **tag)
            if choice.core is flash_attention:
                t0 = time.perf_counter()
                flash_attention(q, k, v)
                torch.cuda.synchronize()
                first = round(time.perf_counter() - t0, 2)
                record("flash-attn-4 bf16 (custom op)", lambda: flash_attention(q, k, v), ref, flops,
                       first_call_s=first, **tag)
            del q, k, v, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f}s")
