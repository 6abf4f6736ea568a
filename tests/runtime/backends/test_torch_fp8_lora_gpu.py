"""GPU: switching LoRAs and strengths on a compiled torch-fp8 pipeline (compile="reduce-overhead",
CUDA graphs) compiles nothing new and records no new CUDA graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sd35trt.runtime import Pipeline
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_writers import write_kohya_lora  # noqa: E402

pytestmark = pytest.mark.gpu


def _graph_ids() -> int:
    """CUDA-graph ids handed out so far by the cudagraph-trees manager of GPU 0 (warm-up and recorded nodes)."""
    from torch._inductor.cudagraph_trees import get_container

    manager = get_container(0).tree_manager
    return -1 if manager is None else int(repr(manager.graph_counter)[len("count("):-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FP8 GEMMs, CUDA graphs)")
def test_two_loras_three_strengths_no_recompile_no_recapture(tiny_models: dict[str, Path], tmp_path: Path,
                                                             capsys) -> None:
    from torch._dynamo.utils import counters

    path = tiny_models["large"]
    kw = dict(prompt="a red fox", negative_prompt="blurry", height=64, width=64, num_inference_steps=3,
              guidance_scale=4.0, output_type="latent", progress=False)
    ref = Pipeline.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    amax = max_calibrate(ref.backend.modules["transformer"], lambda m: ref(**kw), HIGH_PRECISION)
    pipe = Pipeline.from_pretrained(path, backend="torch-fp8", device="cuda", calibration=amax,
                                    compile="reduce-overhead")
    for name, seed in (("a", 1), ("b", 2)):
        write_kohya_lora(path, tmp_path / f"{name}.safetensors", seed=seed)
        pipe.load_lora(tmp_path / f"{name}.safetensors")
    for warm in (None, {"a": 1.0}, {"b": 0.5}):  # compile, warm up and capture the denoising steps once
        pipe(**kw, generator=torch.Generator().manual_seed(0), loras=warm)
    graphs, frames, nodes = counters["stats"]["unique_graphs"], counters["frames"]["ok"], _graph_ids()
    outs = {}
    for lora in ("a", "b"):
        for s in (0.3, 1.0, -0.8):
            outs[lora, s] = pipe(**kw, generator=torch.Generator().manual_seed(0), loras={lora: s}).images.clone()
    new = (counters["stats"]["unique_graphs"] - graphs, counters["frames"]["ok"] - frames, _graph_ids() - nodes)
    with capsys.disabled():
        print(f"\n[6 switches: new dynamo graphs {new[0]}, new frames {new[1]}, new CUDA graph ids {new[2]}]")
    assert new == (0, 0, 0)
    assert not torch.equal(outs["a", 0.3], outs["a", 1.0]) and not torch.equal(outs["a", 1.0], outs["b", 1.0])
