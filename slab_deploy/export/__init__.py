"""torch -> ONNX export, ONNX passes and simplification, ONNX -> TensorRT."""
