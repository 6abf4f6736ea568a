"""sd35trt: FP8 TensorRT inference engine for Stable Diffusion 3.5.

`sd35trt.runtime` runs images (torch reference backend today; ONNX Runtime and TensorRT behind the
same interface); `sd35trt.export` builds checkpoints, ONNX and engines. Importing the package has
no side effects.
"""

__version__ = "0.1.0"
