"""Opt-in speed options of the `torch-fp8` step (issue 18, "the fusions the last measurement left").

Each name is off by default (the runtime's behaviour is unchanged without them); `TorchFP8Backend(
fusions=(...))` applies them, `tools/step_fusions.py` measures each on the GPU (BENCHMARKS.md):

* `adaln-bank`: every joint block's adaLN projection in one GEMM (models/adaln_bank.py), same math.
* `persistent-rows`: inductor generates one-pass (persistent) reductions for rows up to
  PERSISTENT_ROWS elements (its own limit is 1024), so the 2432-wide LayerNorm + modulate +
  quantize rows are read once. Installed as an `InductorChoices` subclass; the FX graph cache is
  off for that compile (the choice is not in its key).
* `mk-persistent`: the same through inductor's own knob (`triton.multi_kernel=2`: persistent
  reductions forced, limit 16 x 1024).
* `quack-qknorm`: the q/k RMS-norm of every fused QKV projection computed in its quack GEMM's
  epilogue (models/fp8_gemm.py `fuse_qk_norm`; needs the quack GEMM). Correct on the H200 but
  slower there: Large step 85.0 vs 81.7 ms without it, one run (BENCHMARKS.md "Sixth session").
* `quack-joint`: each joint attention's image and context QKV GEMMs (quack) write one
  [B, N_img + N_ctx, 3D] buffer, so v is a view and no cat copies it (models/fp8_gemm.py
  `join_qkv`; needs the quack GEMM). Written for the 0.85 ms of joint q/k/v cat in the profiled
  Large step; checked on the CPU only, not yet run on a GPU.
* `combo`, `tune`, `aggressive`, `pointwise-tune`: inductor options (`combo_kernels`,
  `coordinate_descent_tuning`, `aggressive_fusion`, `max_autotune_pointwise`).

Measured on the H200 (2026-12-01, BENCHMARKS.md "Step fusions"): none was faster than the default
beyond the run's +0.6 % drift; `adaln-bank` was 2.0 % and `mk-persistent` 5.7 % slower.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import InvalidInputError

PERSISTENT_ROWS = 4096
FUSIONS = {
    "adaln-bank": "one GEMM for every block's adaLN projection",
    "persistent-rows": f"persistent (one-pass) inductor reductions up to {PERSISTENT_ROWS}-wide rows",
    "mk-persistent": "triton.multi_kernel=2 (persistent reductions forced)",
    "combo": "inductor combo_kernels (horizontal fusion of independent kernels)",
    "tune": "inductor coordinate-descent tuning",
    "aggressive": "inductor aggressive_fusion",
    "pointwise-tune": "inductor max_autotune_pointwise",
    "quack-qknorm": "q/k RMS-norm in the fused QKV GEMM's quack epilogue (needs the quack GEMM)",
    "quack-joint": "joint attention's two QKV GEMMs write one q/k/v buffer, no cat (needs the quack GEMM)",
}
_QUACK = {  # the fusions that rewrite quack's GEMMs: what each does, its function in models/fp8_gemm.py
    "quack-qknorm": ("moves the q/k RMS-norm into the quack GEMM", "fuse_qk_norm"),
    "quack-joint": ("writes both QKV projections of a joint attention into one buffer", "join_qkv"),
}
_OPTIONS = {
    "persistent-rows": {"fx_graph_cache": False},
    "mk-persistent": {"triton.multi_kernel": 2},
    "combo": {"combo_kernels": True},
    "tune": {"coordinate_descent_tuning": True},
    "aggressive": {"aggressive_fusion": True},
    "pointwise-tune": {"max_autotune_pointwise": True},
}


def check_fusions(fusions: Iterable[str]) -> tuple[str, ...]:
    """The names, checked (InvalidInputError naming the unknown ones and the known)."""
    names = tuple(fusions)
    unknown = [f for f in names if f not in FUSIONS]
    if unknown or isinstance(fusions, str):
        raise InvalidInputError(f"torch-fp8 fusions={fusions!r}: unknown {unknown or fusions!r}; pass a tuple of "
                                f"{', '.join(FUSIONS)}")
    return names


def fusion_options(fusions: Iterable[str]) -> dict:
    """The inductor options the names add to torch.compile's."""
    out: dict = {}
    for name in check_fusions(fusions):
        out.update(_OPTIONS.get(name, {}))
    return out


def apply_fusions(model: torch.nn.Module, fusions: Iterable[str]) -> None:
    """The model-side parts, in place: the adaLN bank; the persistent-rows inductor choice."""
    names = check_fusions(fusions)
    if "adaln-bank" in names:
        from ..models.adaln_bank import batch_adaln

        batch_adaln(model)
    if "persistent-rows" in names:
        install_persistent_rows()
    quack = [n for n in _QUACK if n in names]
    if quack:
        from ..models import fp8_gemm

        if not any(getattr(m, "gemm", None) is fp8_gemm.quack_gemm for m in model.modules()):
            raise InvalidInputError(f"torch-fp8 fusion {quack[0]!r} {_QUACK[quack[0]][0]}, and this model runs cuBLAS "
                                    "GEMMs (gemm='cublas', or no sm90 / quack here): drop the fusion or use "
                                    "gemm='auto' on sm90 with quack installed")
        for name in quack:
            getattr(fp8_gemm, _QUACK[name][1])(model)


def _choices_class(limit: int):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class PersistentRowChoices(InductorChoices):
        """Inductor's choices, but inner (row) reductions up to `limit` elements are persistent."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            if cooperative_reduction or features.get_reduction_hint() != ReductionHint.INNER:
                return False
            if not torch._inductor.config.triton.persistent_reductions:
                return False
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)

        def uuid(self) -> str:  # for inductor versions that key their cache on the choices class
            return f"sd35trt-persistent-rows-{limit}"

    return PersistentRowChoices


def install_persistent_rows(limit: int = PERSISTENT_ROWS) -> None:
    """Make inductor's compiles in this thread (and, where the torch has the knob, in new threads)
    use persistent reductions up to `limit`-wide rows. `uninstall_persistent_rows` undoes it."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    cls = _choices_class(limit)
    V.set_choices_handler(cls())
    if hasattr(config, "inductor_choices_class"):
        config.inductor_choices_class = cls


def uninstall_persistent_rows() -> None:
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    V.set_choices_handler(InductorChoices())
    if hasattr(config, "inductor_choices_class"):
        config.inductor_choices_class = None
