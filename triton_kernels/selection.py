"""Token sets on the device: top-B of the draft's scores, merged with sink and window, sorted.

The same sets as sts_edge.mask.select_indices (the numpy reference), for every target layer of a
verification pass in one call, in the CSR layout the verification kernel reads. torch.topk is
used: on an H100 it beat a two-stage top-B (per 4K chunk, then over the candidates), and on an
H200 a sorting-free threshold kernel at 32K and 128K (scripts/bench_kernels.py times both). Callers
select once per distinct draft score row (a draft layer usually stands in for several target
layers), then map the sets to target layers.
"""

from __future__ import annotations

import torch

from sts_edge.triton_kernels.verify_attention import KernelInputError


def select_sets(scores: torch.Tensor, context: int, budget: int, sink: int, window: int) -> torch.Tensor | None:
    """Sorted int32 sets [..., keep] from scores [..., units, >= context], or None when dense.

    keep = min(budget + sink + window, context). Each set holds positions 0..sink-1, the last
    `window` positions before `context`, and the `budget` best-scoring positions between them.
    """
    _check(scores, context, "the context", budget, sink, window)
    if budget + sink + window >= context:
        return None
    top = scores[..., sink : context - window].topk(budget, dim=-1, sorted=False).indices
    window_rows = torch.arange(context - window, context, dtype=torch.int32, device=scores.device)
    return _merge(top, sink, window_rows)


def select_sets_at(scores: torch.Tensor, context: torch.Tensor, bound: int, budget: int, sink: int,
                   window: int) -> torch.Tensor:
    """select_sets with `context` a one-element int32 device tensor, the form a CUDA graph replays
    at every position up to `bound`: scores [..., units, >= bound].

    The candidates are columns sink..bound with those from context - window on masked out, so no
    shape depends on the context. The caller keeps budget + sink + window < context <= bound (the
    layer runs dense otherwise); within that, the sets equal select_sets' (ties aside).
    """
    _check(scores, bound, "the bound", budget, sink, window)
    columns = torch.arange(sink, bound, dtype=torch.int32, device=scores.device)
    candidates = scores[..., sink:bound].masked_fill(columns >= context - window, float("-inf"))
    top = candidates.topk(budget, dim=-1, sorted=False).indices
    window_rows = context - window + torch.arange(window, dtype=torch.int32, device=scores.device)
    return _merge(top, sink, window_rows)


def _check(scores: torch.Tensor, columns: int, name: str, budget: int, sink: int, window: int) -> None:
    if budget < 1 or sink < 0 or window < 0:
        raise KernelInputError(f"budget must be >= 1 and sink, window >= 0, got {budget}, {sink}, {window}")
    if scores.shape[-1] < columns:
        raise KernelInputError(f"scores cover {scores.shape[-1]} positions, fewer than {name} ({columns})")


def _merge(top: torch.Tensor, sink: int, window_rows: torch.Tensor) -> torch.Tensor:
    """Sets [..., sink + window + budget] from top-B column offsets (past the sink), sorted."""
    forced = torch.cat((torch.arange(sink, dtype=torch.int32, device=top.device), window_rows))
    sets = torch.cat((forced.expand(*top.shape[:-1], forced.numel()), top.to(torch.int32) + sink), dim=-1)
    return sets.sort(dim=-1).values


def csr_offsets(units: int, keep: int, device: torch.device) -> torch.Tensor:
    """Offsets [units + 1] of `units` lists of `keep` rows each, laid end to end."""
    return torch.arange(0, (units + 1) * keep, keep, dtype=torch.int32, device=device)
