"""PyTorch backend: runs on NVIDIA GPUs ("cuda") and on the CPU ("torch-cpu")."""

from sts_edge.backends.cuda.loader import TorchCausalLM, load_model, peak_memory, reset_peak_memory

__all__ = ["TorchCausalLM", "load_model", "peak_memory", "reset_peak_memory"]
