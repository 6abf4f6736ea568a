"""`torch-fp8`: the torch backend with the MMDiT's Linears as real FP8 GEMMs (`torch._scaled_mm`).

For GPUs without TensorRT, and the runtime's reference for FP8 fidelity. The calibration is the
one `sd35trt export --precision fp8` saved (ModelOpt max calibration); q/k/v are fused, weights
kept only in FP8, activations quantized with the static calibrated scales, everything else bf16. T5-XXL
runs real FP8 GEMMs too when the calibration folder has T5's scales (`t5_amax.safetensors`, made
with the MMDiT's: models/fp8_text.py), its outlier-heavy `wo` weight-only FP8; without them all its
Linears are weight-only FP8 (bf16 GEMMs); either way about 4.4 GiB instead of 8.8 (`t5_precision`
says which). A stale T5 file (other layers or weights) is refused (CheckpointError).
Attention is the torch backend's choice at load (FlashAttention-4 on sm90/sm100 when
`flash_attn.cute` imports, `sd35trt[hopper]`; cuDNN SDPA on other GPUs; SDPA off CUDA);
`self.attention` says which and why (BENCHMARKS.md has the measurements). The FP8 GEMMs are
quack's CuTe-DSL kernels on sm90 when `quack` imports (FF1 fused with GELU and FF2's quantization),
cuBLAS `_scaled_mm` otherwise (`gemm='auto'|'quack'|'cublas'`; `self.gemm` says which and why:
models/fp8_gemm.py). `fast_accum` is cuBLAS's flag; quack's kernels always accumulate fast (its
promote-every-k-tile path measured 7-8x slower; the step cosines in BENCHMARKS.md are with it). GELU(tanh)
runs as the identical x*sigmoid(2z) form (cheaper compiled). `compile=True` runs the MMDiT and the
VAE decoder under torch.compile (inductor fuses the activation quantization into the producers; its
on-disk cache makes later starts warm; coordinate-descent tuning gained < 1 ms and tripled the warm
start, so it stays off); `compile="reduce-overhead"` also replays the step as a CUDA graph. With `compile` the text encoders
are compiled too (inductor, never CUDA graphs; `compiled_text` lists them), except T5 when its
weights move (memory modes: `load_device` set, T5 streamed block by block by forward hooks in
memory='low'), which stays eager. The VAE encoder (image modes)
runs in bf16, channels-last on CUDA and, with `compile`, compiled there (on the CPU it stays eager).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint import Checkpoint
from ..config import VariantConfig
from ..errors import CheckpointError, InvalidInputError
from ..models.fp8 import FP8Linear, load_amax, to_fp8
from ..models.fp8_gemm import check_gemm, choose_gemm, use_quack
from ..models.fp8_text import TEXT_ENCODERS, compile_text_encoders, load_t5_amax, t5_amax_file, t5_precision
from ..models.mmdit import use_sigmoid_gelu
from .fp8_fusions import apply_fusions, check_fusions, fusion_options
from .torch_backend import TorchBackend


def compile_options(compile: bool | str) -> dict | None:
    """`compile` -> torch.compile options for the MMDiT (None: eager). Raised before any loading."""
    modes = {False: None, True: "default", "default": "default", "reduce-overhead": "reduce-overhead"}
    if not isinstance(compile, (bool, str)) or compile not in modes:
        raise InvalidInputError(f"torch-fp8 compile={compile!r}; use False, True (= 'default') or "
                                f"'reduce-overhead' (CUDA graphs)")
    from torch._inductor import list_mode_options

    return None if modes[compile] is None else list_mode_options(modes[compile])


class TorchFP8Backend(TorchBackend):
    name = "torch-fp8"

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        config: VariantConfig,
        calibration: str | Path | Mapping[str, float] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        load_t5: bool = True,
        compile: bool | str = False,
        fast_accum: bool = False,
        load_device: str | torch.device | None = None,
        fusions: tuple[str, ...] = (),
        gemm: str = "auto",
    ) -> None:
        options = compile_options(compile)
        check_gemm(gemm)
        fusions = check_fusions(fusions)  # opt-in step fusions (fp8_fusions.py); none by default
        if options is not None:
            options = {**options, **fusion_options(fusions)}
        if calibration is None:
            raise CheckpointError("backend 'torch-fp8' needs calibration=<dir with amax.safetensors> "
                                  "(written by `sd35trt export --precision fp8` under <out>/calibration)")
        if dtype not in (None, torch.bfloat16, "bf16"):
            raise InvalidInputError(f"torch-fp8 runs FP8 GEMMs with bf16 outputs; dtype={dtype!r} is not "
                                    f"supported: drop it (bf16)")
        super().__init__(checkpoint, config, device, torch.bfloat16, load_t5, load_device)
        amax = dict(calibration) if isinstance(calibration, Mapping) else load_amax(calibration)
        mmdit = to_fp8(self.modules["transformer"], amax, fast_accum=fast_accum)  # bf16 weights dropped
        use_sigmoid_gelu(mmdit)
        self.gemm = choose_gemm(self.device, gemm)  # quack on sm90 when it imports (models/fp8_gemm.py)
        use_quack(mmdit, self.gemm.name == "quack")
        apply_fusions(mmdit, fusions)
        self.fp8_layers = sum(isinstance(m, FP8Linear) for m in mmdit.modules())
        self.t5_precision, self.compiled_text = None, []
        if "t5" in self.modules:  # FP8 GEMMs with T5's own calibration, else weight-only FP8: half the memory
            t5_amax = None if isinstance(calibration, Mapping) else load_t5_amax(calibration)
            self.t5_precision = t5_precision(self.modules["t5"], t5_amax and t5_amax[0], fast_accum=True,
                                             source=str(t5_amax_file(calibration)) if t5_amax else "")
        vae = self.modules["vae_decoder"]
        if self.device.type == "cuda":
            vae = vae.to(memory_format=torch.channels_last)
        if options is not None:
            mmdit = torch.compile(mmdit, fullgraph=True, options=options)
            vae = torch.compile(vae)
            moves = load_device is not None  # a memory mode moves (memory='low': streams) the weights
            self.compiled_text = compile_text_encoders(self.modules, [n for n in TEXT_ENCODERS if n != "t5" or not moves])
        self.modules.update(transformer=mmdit, vae_decoder=vae)
        encoder = self.modules.get("vae_encoder")
        if encoder is not None and self.device.type == "cuda":
            encoder = encoder.to(memory_format=torch.channels_last)
            self.modules["vae_encoder"] = torch.compile(encoder) if options is not None else encoder
        self.bind()  # the attention core the torch backend chose stays on the FP8 model's attentions
        # A ControlNet runs FP8 GEMMs with the calibration `export_controlnet` writes beside the
        # MMDiT's (<out>/controlnet_calibration, made jointly); without one it runs in bf16.
        cn = None
        if not isinstance(calibration, Mapping):
            own = Path(calibration).parent if Path(calibration).is_file() else Path(calibration)
            cn = own.parent / "controlnet_calibration"
        self._controlnet_amax = load_amax(cn) if cn is not None and (cn / "amax.safetensors").is_file() else None
        self._fast_accum, self.controlnet_fp8_layers, self._compile_options = fast_accum, 0, options

    def _controlnet_module(self, folder: Path) -> torch.nn.Module:
        net = super()._controlnet_module(folder)
        if self._controlnet_amax is not None:
            net = to_fp8(net, self._controlnet_amax, fast_accum=self._fast_accum)  # CheckpointError: another net's
            use_sigmoid_gelu(net)
            use_quack(net, self.gemm.name == "quack")
            self.controlnet_fp8_layers += sum(isinstance(m, FP8Linear) for m in net.modules())
        # compiled like the MMDiT: `sd35trt bench --configs control` measures the pair compiled (BENCHMARKS.md)
        return net if self._compile_options is None else torch.compile(net, fullgraph=True, options=self._compile_options)
