"""MLX backend: Apple-silicon GPUs through Metal, and the CPU (Linux: pip install "mlx[cpu]")."""

from sts_edge.backends.mlx.loader import MLXCausalLM, load_model, peak_memory, reset_peak_memory

__all__ = ["MLXCausalLM", "load_model", "peak_memory", "reset_peak_memory"]
