"""Serve a YOLO export with NVIDIA Triton (pytriton) in its own virtualenv: compact and float32 models."""
