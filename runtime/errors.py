"""Typed errors. Each message names the offending value and how to fix it."""

from __future__ import annotations


class Sd35Error(Exception):
    """Base class of every error raised by sd35trt."""


class InvalidInputError(Sd35Error, ValueError):
    """A request argument is out of range or inconsistent; raised before any heavy work."""


class CheckpointError(Sd35Error, ValueError):
    """A model folder or file is missing, incomplete, or not an SD3.5 checkpoint."""


class NonFiniteLatentsError(Sd35Error, FloatingPointError):
    """NaN or Inf appeared in the latents during denoising (never returned as a black image)."""

    def __init__(self, step: int, sigma: float, backend: str) -> None:
        super().__init__(
            f"latents became non-finite (NaN/Inf) at step {step} (sigma={sigma:.6f}) on backend "
            f"{backend!r}; for fp16 try dtype=torch.bfloat16 or torch.float32, and check the "
            f"checkpoint/engine with the torch fp32 backend"
        )
        self.step = step
        self.sigma = sigma


class GenerationCancelled(Sd35Error):
    """callback_on_step_end asked to stop; carries the step it stopped after."""

    def __init__(self, step: int) -> None:
        super().__init__(f"generation cancelled by callback_on_step_end after step {step}")
        self.step = step
