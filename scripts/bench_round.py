"""Time one speculative round on a GPU: Llama-3.1-8B-shaped target, Llama-3.2-1B-shaped draft.

    python scripts/bench_round.py --contexts 32768,131072

Random weights (timing does not depend on them) and random KV caches filled to the context, so
no checkpoint is needed. One round = gamma draft decode steps (with sparse drafting, --drafting
sparse: the first reads the whole draft cache and scores it, the others the draft's own sets from
those scores), then (STS only) top-B selection on the device, then one target verification pass
over gamma + 1 tokens (with two-stage selection, --candidates N, the draft's top N x B are scored
by each layer's own queries inside the pass, which keeps B). Dense speculative decoding runs the
same round with the dense verification kernel and no scores. Three timings:
  runtime: the models as sts_edge runs them (decode-sized forwards replay CUDA graphs), phases
           timed with device syncs around them, median of several rounds; selection runs inside
           the verification forward (captured in its graph), so its time is in verify_ms;
  eager:   the same with graphs off (STS_EDGE_CUDA_GRAPHS=0): launch overhead included;
  device:  each whole phase captured as one CUDA graph at this context and replayed (median): the
           device time alone, the floor for this loop (selection as the runtime's graph does it,
           over the columns of the context's power-of-two bucket).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from sts_edge.backend import ScoreSpec
from sts_edge.backends.torch.graphs import DecodeGraphs
from sts_edge.backends.torch.loader import TorchModel
from sts_edge.backends.torch.model import Reads, Transformer
from sts_edge.backends.torch.quantized_kv import QuantizedKVCache
from sts_edge.backends.torch.selection import LayerSets, select_sets_at
from sts_edge.config import ModelConfig
from sts_edge.mask import LayerHeadMap, MaskPolicy, VerificationPlan
from sts_edge.sampling import GREEDY

from bench_kernels import run_header

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072)
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)


def random_model(raw: dict, capacity: int, quantize=None, kv_bits: int = 16) -> TorchModel:
    """A model of config `raw` with random bf16 weights on the GPU (`quantize`, given the model on the
    meta device, may put packed layers in first), and a filled cache (`kv_bits` 8 or 4: quantized):
    random rows, as if the context had been prefilled."""
    config = ModelConfig.from_dict(raw, source="benchmark shape")
    with torch.device("meta"):
        model = Transformer(config).eval()
    if quantize is not None:
        quantize(model)
    generator = torch.Generator("cuda").manual_seed(0)
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_meta:
                values = torch.empty(tensor.shape, device="cuda", dtype=torch.bfloat16)
                values = values.fill_(1.0) if name == "weight" and tensor.dim() == 1 else values.normal_(0, 0.02, generator=generator)
                setattr(module, name, torch.nn.Parameter(values, requires_grad=False) if name in module._parameters else values)
    lm = TorchModel(model, capacity, kv_bits=kv_bits)
    for layer in model.layers:
        cache = layer.self_attn.cache
        if isinstance(cache, QuantizedKVCache):  # rows of about unit spread, as normal_() gives the others
            for name in ("k", "v"):
                getattr(cache, f"{name}_values").random_(0, 256)
                getattr(cache, f"{name}_scales").fill_(6 / ((1 << kv_bits) - 1))
                getattr(cache, f"{name}_biases").fill_(-3.0)
        else:
            cache.k.normal_()
            cache.v.normal_()
    return lm


def timed(fn) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1000


def score_spec(plan: VerificationPlan | None) -> ScoreSpec | None:
    return ScoreSpec(plan.policy.granularity, plan.policy.aggregation) if plan else None


def one_round(target: TorchModel, draft: TorchModel, context: int, gamma: int, plan: VerificationPlan | None) -> dict:
    """Milliseconds of each phase of one round, both models starting at `context` committed tokens,
    through the backend protocol as the speculative loop calls it (greedy)."""
    target.rollback(0)
    draft.rollback(0)
    target._length = draft._length = context  # the caches already hold `context` rows
    rng = np.random.default_rng(0)
    first = int(rng.integers(0, target.config.vocab_size))
    proposals = []

    def drafting():
        proposals.append(draft.draft([first], gamma, GREEDY, rng, scores=score_spec(plan),
                                     sparse_steps=plan.for_draft(draft.config) if plan else None))

    def verifying():  # selection runs inside (in the verification graph, or eagerly)
        proposal = proposals[-1]
        target.verify([first] + proposal.tokens, GREEDY, plan, proposal.scores).argmax()

    return {"draft_ms": timed(drafting), "select_ms": 0.0, "verify_ms": timed(verifying)}


def graph_ms(record, replays: int = 10) -> float:
    """Capture record() in a CUDA graph (after a warm-up run) and time its replays: median ms."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        record()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def graphed_round(target: TorchModel, draft: TorchModel, context: int, gamma: int, plan: VerificationPlan | None) -> dict:
    """The same round's phases, each captured as a CUDA graph at this context and replayed: the
    device time a graph-captured runtime would see, with no launch overhead."""
    rng = np.random.default_rng(1)
    tokens = torch.tensor(rng.integers(0, target.config.vocab_size, gamma + 1), device="cuda")
    scores = draft._new_scores(score_spec(plan)) if plan else None
    own = plan.for_draft(draft.config) if plan else None  # sparse drafting's plan for the later steps

    def drafting():
        if scores is not None:
            scores.buffer.zero_()
        for i in range(gamma):
            reads = Reads(scores=scores) if i == 0 or own is None else \
                Reads(sets=LayerSets(own, context + i, draft.config.num_key_value_heads, scores.buffer))
            draft.model(tokens[i : i + 1], context + i, False, reads)

    row = {"draft_ms": graph_ms(drafting)}
    sets = LayerSets(plan, context, target.config.num_key_value_heads, scores.buffer) if plan else None
    # Selection as the runtime's verification graph replays it: at a device-side position, over
    # the columns of the position's bucket (up to twice the context).
    bound = DecodeGraphs(target.model, target.capacity).bound(context, gamma + 1)
    at = torch.tensor([context], dtype=torch.int32, device="cuda")

    def selecting():
        policy = plan.policy
        sets.draft_sets = select_sets_at(scores.buffer, at, bound, policy.candidates * policy.budget_tokens(context),
                                         policy.sink, policy.window)

    row["select_ms"] = graph_ms(selecting) if plan else 0.0
    row["verify_ms"] = graph_ms(lambda: target.model(tokens, context, True, Reads(sets=sets)))
    return row


def bench_round(contexts: list[int], gamma: int = 4, budget: int = 512, rounds: int = 5,
                modes: tuple[str, ...] = ("runtime", "eager", "device"), draft_kv_bits: tuple[int, ...] = (16,),
                drafting: tuple[str, ...] = ("dense",), candidates: tuple[int, ...] = (1,)) -> list[dict]:
    capacity = max(contexts) + 64
    target = random_model(LLAMA_8B, capacity)
    rows = []
    for kv_bits in draft_kv_bits:
        draft = random_model(LLAMA_1B, capacity, kv_bits=kv_bits)
        rows += _rounds(target, draft, contexts, gamma, budget, rounds, modes, kv_bits, drafting, candidates)
        del draft
        torch.cuda.empty_cache()
    # The comparison: each round against dense speculative decoding with the bf16 draft cache.
    for row in rows:
        base = next((r for r in rows if r["context"] == row["context"] and r["method"] == "dense speculative"
                     and r["draft_kv_bits"] == 16), None)
        for mode in modes:
            if base is not None:
                row[mode]["speedup_vs_dense_bf16_draft"] = base[mode]["round_ms"] / row[mode]["round_ms"]
    return rows


def _rounds(target: TorchModel, draft: TorchModel, contexts: list[int], gamma: int, budget: int, rounds: int,
            modes: tuple[str, ...], kv_bits: int, drafting: tuple[str, ...], candidates: tuple[int, ...]) -> list[dict]:
    mapping = LayerHeadMap.proportional(target.config, draft.config, "kv")
    methods = [("dense speculative", None)] + [
        ("sts" + ("" if how == "dense" else ", sparse drafting") + ("" if k == 1 else f", two-stage x{k}"),
         VerificationPlan(MaskPolicy("sts", budget=budget, sink=4, window=64, drafting=how, candidates=k), mapping))
        for how in drafting for k in candidates]
    rows = []
    with torch.inference_mode():
        for context in contexts:
            for name, sparse in methods:
                row = {"context": context, "method": name, "gamma": gamma, "budget": budget if sparse else None,
                       "draft_kv_bits": kv_bits, "drafting": sparse.policy.drafting if sparse else "dense",
                       "candidates": sparse.policy.candidates if sparse else None}
                graphs = target.graphs, draft.graphs
                for mode in modes:
                    if mode == "device":
                        phases = graphed_round(target, draft, context, gamma, sparse)
                    else:
                        if mode == "eager":
                            target.graphs = draft.graphs = None
                        one_round(target, draft, context, gamma, sparse)  # warm-up: compilation, graph capture
                        runs = [one_round(target, draft, context, gamma, sparse) for _ in range(rounds)]
                        phases = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                        target.graphs, draft.graphs = graphs
                    row[mode] = {**phases, "round_ms": sum(phases.values())}
                    print(f"round ctx {context:>6} {name:>20} kv{kv_bits:<2} {mode:>8}: draft {phases['draft_ms']:6.2f} ms, "
                          f"select {phases['select_ms']:5.2f} ms, verify {phases['verify_ms']:6.2f} ms, "
                          f"round {row[mode]['round_ms']:6.2f} ms", flush=True)
                rows.append(row)
            dense = rows[-len(methods)]
            for sts in rows[-len(methods) + 1 :]:
                for mode in modes:
                    sts[mode]["round_speedup"] = dense[mode]["round_ms"] / sts[mode]["round_ms"]
                    sts[mode]["verify_speedup"] = dense[mode]["verify_ms"] / sts[mode]["verify_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--modes", default="runtime,eager,device", help="which timings (see above)")
    parser.add_argument("--draft-kv-bits", default="16", help="the draft cache's precisions, comma separated, of 16,8,4")
    parser.add_argument("--drafting", default="dense", help="STS's drafting modes, comma separated, of dense,sparse")
    parser.add_argument("--candidates", default="1,5", help="STS's two-stage nominations per budget token, comma "
                        "separated (1: the draft's top B as they are; 5: the runtime's default)")
    parser.add_argument("--out", help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_round.py needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = bench_round([int(c) for c in args.contexts.split(",")], args.gamma, args.budget,
                       modes=tuple(args.modes.split(",")),
                       draft_kv_bits=tuple(int(b) for b in args.draft_kv_bits.split(",")),
                       drafting=tuple(args.drafting.split(",")),
                       candidates=tuple(int(k) for k in args.candidates.split(",")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**run_header(), "round": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
