"""Runners: one interface over torch, ONNX Runtime and TensorRT."""
