"""Regional compilation of the MMDiT (`compile_mmdit(scope="blocks")`), dynamo only, on the CPU:
the blocks share their traced code (one graph per kind of block), their outputs are copies, and
the output is the eager one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd35trt.runtime.backends.torch_fp8_set import compile_mmdit
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.errors import InvalidInputError
from sd35trt.runtime.models.loader import load_modules


def test_blocks_share_one_graph_per_kind_and_match_eager(tiny_models: dict[str, Path]) -> None:
    from torch._dynamo.utils import counters

    ckpt = Checkpoint.open(tiny_models["large"])
    config = ckpt.config
    mmdit = load_modules(ckpt, ["transformer"], torch.device("cpu"), torch.float32)["transformer"]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(config.latent_shape(2, 64, 64), generator=g), torch.full((2,), 300.0),  # [2, 16, 8, 8], [2]
            torch.randn(2, config.text_tokens(), config.joint_dim, generator=g),  # [2, 77+T, joint]
            torch.randn(2, config.pooled_dim, generator=g))  # [2, pooled]
    keys = list(mmdit.state_dict())
    with torch.no_grad():
        want = mmdit(*args)
        torch._dynamo.reset()
        counters.clear()
        got = compile_mmdit(mmdit, "blocks", backend="eager")(*args)
        graphs = counters["stats"]["unique_graphs"]
        last = mmdit.transformer_blocks[-1]
        assert last.last  # passes its ctx through: compiled alone it would return its input tensor
        x, ctx = torch.randn(2, 16, config.transformer.inner_dim), torch.randn(2, 5, config.transformer.inner_dim)
        temb = torch.randn(2, config.transformer.inner_dim)
        out_x, out_ctx = last(x, ctx, temb)
    # every block's outputs are copies made outside the compiled region (CUDA-graph replays of the
    # shared block graph reuse one memory pool), and the state dict keeps its names (LoRA, sets)
    assert out_ctx.data_ptr() != ctx.data_ptr() and torch.equal(out_ctx, ctx)
    assert list(mmdit.state_dict()) == keys
    kinds = {(b.last, b.dual) for b in mmdit.transformer_blocks}
    assert len(mmdit.transformer_blocks) > len(kinds)  # some blocks are alike
    assert graphs == len(kinds)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match="compile_scope"):
        compile_mmdit(mmdit, "layers")
