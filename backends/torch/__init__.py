"""PyTorch backend: runs on NVIDIA GPUs ("cuda", with the Triton kernels and CUDA graphs) and on the CPU ("torch-cpu")."""

from sts_edge.backends.torch.loader import TorchModel, auto_device, load_model, peak_memory, reset_peak_memory

__all__ = ["TorchModel", "auto_device", "load_model", "peak_memory", "reset_peak_memory"]
