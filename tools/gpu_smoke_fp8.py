"""GPU smoke of the runtime's `torch-fp8` backend through Pipeline (tiny checkpoint, CUDA, compiled).

Run on the GPU host from the repository root, with the package on PYTHONPATH as tools/gpu_run.sh
lays it out: `python3 tools/gpu_smoke_fp8.py`. ModelOpt is not on that host, so the calibration is the same max
statistic gathered with forward hooks (runtime.models.fp8.max_calibrate).
"""

import tempfile
import time
from pathlib import Path

import torch

from sd35trt.export.tiny_model import read_corpus, write_tiny_model
from sd35trt.runtime import Pipeline
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate

KW = dict(prompt="a red fox in fresh snow", negative_prompt="blurry", height=128, width=128,
          num_inference_steps=8, guidance_scale=4.5, output_type="latent", progress=False)
corpus = read_corpus(Path(__file__).resolve().parents[1] / "calib_prompts" / "prompts.txt")
path = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny", family="medium", seed=0, corpus=corpus)
ref_pipe = Pipeline.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
model = ref_pipe.backend.transformer.model
amax = max_calibrate(model, lambda m: ref_pipe(**KW, generator=torch.Generator().manual_seed(1)), HIGH_PRECISION)
ref = ref_pipe(**KW, generator=torch.Generator().manual_seed(0)).images
for compile_ in (False, True, "reduce-overhead"):
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(path, backend="torch-fp8", calibration=amax, device="cuda", compile=compile_)
    out = pipe(**KW, generator=torch.Generator().manual_seed(0)).images
    cos = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
    print(f"torch-fp8 compile={compile_}: {pipe.backend.fp8_layers} FP8 layers, first image {time.perf_counter() - t0:.1f}s, "
          f"final-latent cosine vs bf16 {cos:.5f}, finite {bool(torch.isfinite(out).all())}")
