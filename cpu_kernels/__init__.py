"""CPU kernels (C++ built on first use by PyTorch's extension loader): affine_matmul.cpp."""
