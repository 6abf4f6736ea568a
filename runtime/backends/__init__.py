"""Backends: one callable per component behind the `Backend` protocol, looked up by name."""

from .base import Backend, BackendBase, ComponentCall, Limits, available, backend_limits, load_backend, register


def _torch():
    from .torch_backend import TorchBackend

    return TorchBackend


def _onnxruntime():
    from .ort_backend import OrtBackend

    return OrtBackend


def _tensorrt(flavor: str):
    def loader():
        from .trt_backend import FLAVOR_BACKENDS

        return FLAVOR_BACKENDS[flavor]

    return loader


def _torch_fp8():
    from .torch_fp8_set import torch_fp8_factory  # a checkpoint or a torch-fp8 engine set

    return torch_fp8_factory


register("torch", _torch)
register("torch-fp8", _torch_fp8)
register("onnxruntime", _onnxruntime)
register("tensorrt", _tensorrt("tensorrt"))  # enterprise TensorRT engine sets (`sd35trt build`)
register("tensorrt-rtx", _tensorrt("tensorrt-rtx"))

__all__ = ["Backend", "BackendBase", "ComponentCall", "Limits", "available", "backend_limits", "load_backend", "register"]
