"""One rank of the CFG-parallel test (tests/runtime/backends/test_cfg_parallel.py), run as a script:
    python cfg_parallel_worker.py RANK RENDEZVOUS_FILE MODEL BACKEND OUT
Joins a 2-rank gloo group on this machine (a file rendezvous, gloo's pairs on the loopback
interface), generates one CFG request through CfgParallel over BACKEND (torch: fp32 on the CPU; onnxruntime:
one thread per component), and
writes its latents, its 8-bit image and the transformer rows this rank ran to OUT (safetensors)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sd35trt.runtime import Pipeline
from sd35trt.runtime.backends.cfg_parallel import CfgParallel

REQUEST = dict(prompt="a lighthouse on a cliff", negative_prompt="blurry", height=64, width=64,
               num_inference_steps=4, guidance_scale=5.0)
SEED = 11


def load(model: str, backend: str) -> Pipeline:
    options = {"device": "cpu", "dtype": torch.float32} if backend == "torch" else {"intra_op_threads": 1}
    return Pipeline.from_pretrained(model, backend=backend, **options)


def main(rank: int, rendezvous: str, model: str, backend: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    pipe = load(model, backend)
    inner, rows = pipe.backend.transformer, []

    def counted(x, t, context, pooled, **kw):  # the rows this rank's transformer really ran
        rows.append(x.shape[0])
        return inner(x, t, context, pooled, **kw)

    pipe.backend.transformer = counted
    pipe.backend = CfgParallel(pipe.backend)
    latents = pipe(**REQUEST, generator=torch.Generator().manual_seed(SEED), output_type="latent", progress=False).images
    image = pipe(**REQUEST, generator=torch.Generator().manual_seed(SEED), output_type="pil", progress=False).images[0]
    save_file({"latents": latents.contiguous(), "image": torch.from_numpy(np.array(image)),  # [64, 64, 3] uint8
               "rows": torch.tensor(rows)}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:6])
