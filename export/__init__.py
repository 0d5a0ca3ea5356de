"""vidrt.export: load Wan checkpoints (torch), export ONNX model packages, build engines."""
