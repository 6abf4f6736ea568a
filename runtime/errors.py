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


class NonFiniteImageError(Sd35Error, FloatingPointError):
    """The VAE decoded finite latents into NaN/Inf pixels (e.g. latents far outside the VAE's range)."""

    def __init__(self, backend: str, latent_absmax: float) -> None:
        super().__init__(
            f"VAE decode on backend {backend!r} produced NaN/Inf pixels from latents with max |x| = "
            f"{latent_absmax:.3g}; check guidance_scale (extreme values blow the latents up) and the VAE "
            f"weights/engine with the torch fp32 backend"
        )


class GenerationCancelled(Sd35Error):
    """callback_on_step_end asked to stop; carries the step it stopped after."""

    def __init__(self, step: int) -> None:
        super().__init__(f"generation cancelled by callback_on_step_end after step {step}")
        self.step = step


class BackendError(Sd35Error, RuntimeError):
    """A component failed while running a request (the backend's own error, with the component
    file and input shapes); the pipeline stays usable for the next request."""


class OutOfMemoryError(BackendError, MemoryError):
    """A component ran out of (host or device) memory on one request; a smaller size or batch, or a
    larger memory limit, fixes it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Our typed OutOfMemoryError, Python's MemoryError (OutOfMemoryError is one) or torch's CUDA
    out-of-memory error."""
    import torch

    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))


class QueueFullError(Sd35Error, RuntimeError):
    """The micro-batcher's queue holds `max_queue` waiting requests; retry later or raise max_queue."""


class ClosedError(Sd35Error, RuntimeError):
    """The pipeline or micro-batcher was closed (or is shutting down) and takes no new requests."""
