"""Runtimes for the `gate2deploy` custom ops (see OPS.md): plain reference implementations
(`reference.py`), the ONNX Runtime custom-op library and the Triton kernels."""
