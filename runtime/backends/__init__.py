"""Backends: one callable per component behind the `Backend` protocol, looked up by name."""

from .base import Backend, available, load_backend, register


def _torch():
    from .torch_backend import TorchBackend

    return TorchBackend


def _onnxruntime():
    from .ort_backend import OrtBackend

    return OrtBackend


register("torch", _torch)
register("onnxruntime", _onnxruntime)

__all__ = ["Backend", "available", "load_backend", "register"]
