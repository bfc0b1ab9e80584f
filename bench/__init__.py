"""`python -m sts_edge.bench`: end-to-end latency of sts-edge and of the runtimes people use instead.

Served as `sts_edge.bench` from the repository's bench/ folder (pyproject.toml's package-dir), outside
the framework-free core: the peers' runners import PyTorch and MLX.
"""
