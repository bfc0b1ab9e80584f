"""The stats line: every figure means what its label says, checked against counts computed here."""

import re

import numpy as np
import pytest

from sts_edge import load
from sts_edge.mask import MaskPolicy
from sts_edge.speculative import GenerationStats


@pytest.fixture(scope="module")
def engine(model_dirs, draft_dir):
    return load(model_dirs["llama3"], draft=draft_dir, backend="torch-cpu", calibration=None, max_seq_len=256)


def test_reuse_after_a_call_without_the_draft_counts_what_the_draft_prefilled(engine):
    prompt = engine.tokenizer.encode("The old lighthouse stood at the edge of the harbour. " * 3)
    engine.generate(prompt, max_tokens=4, use_draft=False)
    # The target's cache now holds the prompt and 3 answer tokens; the draft's holds nothing.
    follow_up = prompt + engine.generate(prompt, max_tokens=4, use_draft=False, reuse_cache=True).tokens[:3] + [5, 6]
    stats = engine.generate(follow_up, max_tokens=6, gamma=3, reuse_cache=True).stats
    reused = len(prompt) + 3
    assert (stats.cached_tokens, stats.draft_cached_tokens) == (reused, 0)
    # The draft prefilled the whole prompt, so the prompt's rate counts all of it, none reused.
    summary = stats.summary()
    assert f"prompt {len(follow_up)} tok, prefill" in summary and "reused" not in summary
    rate = float(re.search(r"prefill ([\d.]+) tok/s", summary).group(1))
    assert rate == pytest.approx(len(follow_up) / stats.prompt_seconds, rel=0.01, abs=0.1)
    again = engine.generate(follow_up, max_tokens=2, gamma=3, reuse_cache=True).stats
    assert f"({len(follow_up) - 1} reused)" in again.summary()  # both caches hold it now


def test_a_one_token_answer_claims_no_decode_rate(engine):
    stats = engine.generate("The keeper", max_tokens=1).stats
    assert stats.generated_tokens == 1 and stats.rounds == 0
    assert "generated 1 tok" in stats.summary() and "decode" not in stats.summary()
    assert "tok/round" not in stats.summary()


def test_rates_acceptance_and_rounds_follow_their_counts(engine):
    result = engine.generate("The old lighthouse", max_tokens=20, gamma=4)
    stats = result.stats
    assert stats.generated_tokens == len(result.tokens)
    assert stats.decode_rate == pytest.approx((len(result.tokens) - 1) / stats.decode_seconds)
    accepted = sum(n * count for n, count in enumerate(stats.accepted_histogram))
    assert stats.draft_tokens == 4 * stats.rounds == 4 * sum(stats.accepted_histogram)
    assert stats.acceptance_rate == pytest.approx(accepted / stats.draft_tokens)
    # Every round commits its accepted drafts plus one target token (the last round may be cut short).
    assert len(result.tokens) - 1 <= accepted + stats.rounds
    shown = re.search(r"decode ([\d.]+) tok/s", stats.summary()).group(1)
    assert float(shown) == pytest.approx(stats.decode_rate, rel=0.05, abs=0.1)
    assert f"verify {1000 * stats.target_seconds / stats.rounds:.1f} ms/round" in stats.summary()


def test_sparsity_counts_the_rows_each_layer_read(engine):
    """Target alone with a streaming policy: one token per round, so the contexts are known here."""
    prompt = engine.tokenizer.encode("The keeper climbed the narrow stairs and trimmed the wick. " * 4)
    policy = MaskPolicy("streaming", budget=8, sink=2, window=6)
    stats = engine.generate(prompt, max_tokens=5, use_draft=False, policy=policy).stats
    layers = engine.target.config.num_hidden_layers
    contexts = [len(prompt) + i for i in range(stats.rounds)]  # context before each single-token round
    assert stats.rounds == 4
    assert stats.dense_rows == layers * sum(contexts)
    assert stats.kept_rows == layers * sum(min(16, c) for c in contexts)
    assert "sparse verification (streaming)" in stats.summary()
    dense = engine.generate(prompt, max_tokens=5, use_draft=False, policy="dense").stats
    assert dense.dense_rows == 0 and "sparse" not in dense.summary()
    two_stage = engine.generate(prompt, max_tokens=5, budget=8, sink=2, window=6, candidates=3).stats
    assert "sparse verification (sts, two-stage x3)" in two_stage.summary()


def status_bytes(field: str) -> int:
    status = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def test_peak_memory_is_this_answer_s_not_the_process_lifetime(engine):
    import mmap

    ballast = mmap.mmap(-1, 1 << 30)  # 1 GiB resident before the answer, unmapped (so surely gone) during it
    ballast.write(b"\1" * (1 << 30))
    before = status_bytes("VmHWM")
    ballast.close()
    assert status_bytes("VmRSS") < before - (1 << 29)
    stats = engine.generate("The harbour", max_tokens=3).stats
    assert stats.peak_memory_of == "process RSS" and 0 < stats.peak_memory_bytes
    assert stats.peak_memory_bytes < before - (1 << 29)
    assert f"peak memory {stats.peak_memory_bytes / 2**30:.2f} GiB (process RSS)" in stats.summary()


def test_summary_of_empty_stats_does_not_divide_by_zero():
    assert "generated 0 tok" in GenerationStats().summary()
