"""GGUF import: tiny llama-layout GGUF files written here, read back by us and by transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sts_edge import ModelLoadError
from sts_edge.backend import load_model
from sts_edge.config import ModelConfig
from sts_edge.conversion import OutputDirError, _llama3_rope_scaling, convert, unpermute
from sts_edge.tokenizer import Tokenizer


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """A llama.cpp-style GGUF of a tiny HF llama directory (q/k rows permuted as llama.cpp does)."""
    import gguf
    from safetensors.numpy import load_file
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    weights = {}
    for f in model_dir.glob("*.safetensors"):
        weights.update(load_file(f))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(cfg["num_hidden_layers"]); writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"]); writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads); writer.add_head_count_kv(kv); writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"]); writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = sorted({**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}.items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    special = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2"); writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special or t.startswith("[PAD") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_bos_token_id(ids["<|begin_of_text|>"]); writer.add_eos_token_id(ids["<|eot_id|>"])
    writer.add_chat_template(tcfg["chat_template"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, w in weights.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            mod = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{layer[mod]}.{parts[-1]}"
        w = w.astype(np.float32)
        if "q_proj.weight" in name: w = permute(w, heads)
        if "k_proj.weight" in name: w = permute(w, kv)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gname, w)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    return out


@pytest.fixture(scope="module", params=["smollm2", "llama3-untied"])
def tiny_gguf(request, make_model, tmp_path_factory):
    if request.param == "smollm2":
        source = make_model("smollm2")
    else:  # GQA and a separate output matrix; llama3 scaling is covered by its own test below
        source = make_model("llama3", rope_scaling=None, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    return write_tiny_gguf(Path(source), out)


def test_converted_llama_gguf_matches_transformers(tiny_gguf, tmp_path, monkeypatch):
    """Q8_0 tensors, llama.cpp's q/k row order, a gpt2 tokenizer: all undone as transformers does.
    Tensors are decoded a few rows at a time, as a large one is (a partial block last)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sts_edge import conversion

    monkeypatch.setattr(conversion, "BLOCK_VALUES", 1000)
    out = convert(tiny_gguf, tmp_path / "converted", progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json",
                                               "generation_config.json", "model.safetensors.index.json"}
    hf = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in hf.parameters():  # our directory stores bfloat16
            parameter.data = parameter.data.bfloat16().float()
        ids = list(range(3, 60))
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    for backend in ("torch-cpu", "mlx"):
        got = load_model(out, backend, max_seq_len=64).verify(ids).logits()
        np.testing.assert_allclose(got, expected, atol=1e-4)
    reference = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "The keeper climbed 123 stairs.\n\ndef f(x):\n    return x  # ünï"
    assert Tokenizer(out).encode(text) == reference(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer(out).apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_convert_cli_and_bad_files(tiny_gguf, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--gguf", str(tiny_gguf), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "wrote" in done.stdout
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    failed = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--gguf", str(bad), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "not a readable GGUF" in failed.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    with pytest.raises(ModelLoadError, match="does not exist"):
        convert(tmp_path / "missing.gguf", tmp_path / "y")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = w.reshape(8, 2, 8, 3).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute for 8 heads
    np.testing.assert_array_equal(unpermute(permuted, 8), w)


def test_llama3_rope_factors_become_rope_scaling(tmp_path):
    """llama.cpp stores Llama 3.1's scaling as per-frequency factors; we recover the config from them."""
    head_dim, theta = 128, 500000.0
    raw = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 1,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 10, "rope_theta": theta,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    scaled = ModelConfig.from_dict(raw).rope_inv_freq()
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = plain / scaled  # what llama.cpp writes as rope_freqs.weight
    recovered = _llama3_rope_scaling(factors, theta, head_dim)
    assert recovered == raw["rope_scaling"]
    with pytest.raises(ModelLoadError, match="not Llama 3"):
        _llama3_rope_scaling(factors * 1.5, theta, head_dim)


# --- the output directory: nothing of the user's is ever lost ------------------------------------


def leftovers(parent: Path, keep: set[str]) -> set[str]:
    return {p.name for p in parent.iterdir()} - keep


def test_convert_refuses_a_directory_of_user_files_before_any_work(tmp_path):
    project = tmp_path / "my_project"
    (project / "src").mkdir(parents=True)
    (project / "README.txt").write_text("mine")
    (project / "src" / "main.py").write_text("print('mine')")
    for force in (False, True):
        # The GGUF path does not even exist: the output check must come first.
        with pytest.raises(OutputDirError, match="did not write"):
            convert(tmp_path / "missing.gguf", project, progress=False, force=force)
    assert (project / "README.txt").read_text() == "mine" and (project / "src" / "main.py").read_text() == "print('mine')"
    assert leftovers(tmp_path, {"my_project"}) == set()


def test_convert_refuses_an_existing_file_before_any_work(tmp_path):
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    with pytest.raises(OutputDirError, match="existing file"):
        convert(tmp_path / "missing.gguf", target, progress=False)
    assert target.read_text() == "keep me" and leftovers(tmp_path, {"afile.txt"}) == set()


def test_force_replaces_only_what_a_conversion_wrote(tiny_gguf, tmp_path, monkeypatch):
    import sts_edge.conversion as convert_module

    out = convert(tiny_gguf, tmp_path / "model", progress=False)
    ours = {p.name for p in out.iterdir()}
    (out / "notes.md").write_text("my notes")
    with pytest.raises(OutputDirError, match="--force"):
        convert(tiny_gguf, out, progress=False)
    # A conversion that fails half-way leaves the earlier model and the notes as they were.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_write(path, tensors, dtype="BF16"):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert(tiny_gguf, out, progress=False, force=True)
    assert calls and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, {"model"}) == set()
    monkeypatch.undo()
    convert(tiny_gguf, out, progress=False, force=True)
    assert {p.name for p in out.iterdir()} == ours | {"notes.md"}
    assert (out / "notes.md").read_text() == "my notes"
    assert load_model(out, "torch-cpu", max_seq_len=16).prefill([1, 2, 3]).logits().shape[0] == 1


def test_convert_cli_says_what_is_wrong_with_the_paths(tmp_path):
    import subprocess
    import sys

    (tmp_path / "adir").mkdir()
    result = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--gguf", str(tmp_path / "adir"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "is a directory" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "afile.txt").write_text("x")
    result = subprocess.run([sys.executable, "-m", "sts_edge.convert", "--gguf", str(tmp_path / "adir"), "--out",
                             str(tmp_path / "afile.txt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "existing file" in result.stderr and "Traceback" not in result.stderr
    assert leftovers(tmp_path, {"adir", "afile.txt"}) == set()
