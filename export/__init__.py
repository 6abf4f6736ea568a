"""Export side: tiny checkpoints, (later) FP8 calibration, ONNX export and engine builds."""
