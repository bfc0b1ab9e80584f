"""MLX backend: Apple-silicon GPUs through Metal, and the CPU (Linux: pip install "mlx[cpu]")."""

from sts_edge.backends.mlx.loader import MLXModel, load_model, peak_memory, reset_peak_memory

__all__ = ["MLXModel", "load_model", "peak_memory", "reset_peak_memory"]
