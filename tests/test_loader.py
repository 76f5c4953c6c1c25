"""hetserve.model.loader against transformers' reading of the same files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file

from hetserve.model import loader
from hetserve.model.loader import DEFAULT_MODEL, iter_weights, load_spec, resolve_model_path
from hetserve.model.spec import RopeScaling
from tests.tiny_models import K_QUANTS, llama_cpp_permute, make_gguf_model, make_hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Small vocabulary and no tokenizer metadata: these files exist only to compare weights.
TINY = {"vocab_size": 512, "with_tokenizer": False}
# K-quant blocks hold 256 values, so every input dimension must be a multiple of it.
K_QUANT_SHAPES = {"hidden_size": 256, "intermediate_size": 256}


def transformers_state_dict(gguf_path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return detached_state_dict(model)


def detached_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def assert_same_as_transformers(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tied: bool) -> None:
    expected_names = set(theirs) - {"lm_head.weight"} if tied else set(theirs)
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name]), name
    if tied:
        assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


def gguf_tensor_types(path: Path) -> set[str]:
    return {t.tensor_type.name for t in GGUFReader(path).tensors}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2_weights(smollm_path) -> dict[str, torch.Tensor]:
    return dict(iter_weights(smollm_path, load_spec(smollm_path)))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama", rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", tie_word_embeddings=True, num_layers=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


# --------------------------------------------------------------------------- resolve_model_path


@pytest.mark.parametrize("name", [None, "default", DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_default_names_resolve_to_packaged_gguf(name, smollm_path):
    assert resolve_model_path(name) == smollm_path


def test_resolve_gguf_file_and_dir_holding_one(tmp_path):
    path = make_gguf_model(tmp_path / "only.gguf", **TINY)
    assert resolve_model_path(path) == path
    assert resolve_model_path(str(tmp_path)) == path


def test_resolve_hf_dir(hf_llama):
    assert resolve_model_path(hf_llama) == hf_llama
    assert resolve_model_path(str(hf_llama)) == hf_llama


def test_resolve_dir_with_two_ggufs_names_them(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        make_gguf_model(tmp_path / name, **TINY)
    with pytest.raises(ValueError, match=r"a\.gguf, b\.gguf"):
        resolve_model_path(tmp_path)


@pytest.mark.parametrize("what", ["missing", "empty dir", "not gguf", "hub name"])
def test_resolve_unknown_model_says_what_was_looked_for(tmp_path, what):
    model = {
        "missing": tmp_path / "nope.gguf",
        "empty dir": tmp_path,
        "not gguf": tmp_path / "model.bin",
        "hub name": "meta-llama/Llama-3.2-1B",
    }[what]
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"model: .*not found.*\.gguf") as error:
        resolve_model_path(model)
    assert str(model) in str(error.value)


# --------------------------------------------------------------------------- SmolLM2 (the default GGUF)


def test_smollm2_spec(smollm_path):
    spec = load_spec(smollm_path)
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.intermediate_size) == ("llama", 30, 576, 1536)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert spec.tie_word_embeddings and not spec.qkv_bias and spec.rope_scaling is None
    assert spec.rope_theta == 100000.0
    assert spec.rms_norm_eps == pytest.approx(1e-5)
    assert spec.max_position == 8192
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))


def test_smollm2_weights_equal_transformers(smollm2_weights, hf_smollm):
    assert_same_as_transformers(smollm2_weights, detached_state_dict(hf_smollm), tied=True)
    q = smollm2_weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (576, 576) and q.is_contiguous()


def test_wanted_dequantizes_only_requested_layers(smollm_path, smollm2_weights, monkeypatch):
    calls = []
    real = loader.dequantize
    monkeypatch.setattr(loader, "dequantize", lambda data, qtype: calls.append(qtype) or real(data, qtype))
    in_stage = re.compile(r"model\.layers\.(1\d)\.")

    stage = dict(iter_weights(smollm_path, load_spec(smollm_path), lambda name: bool(in_stage.match(name))))

    expected = {name for name in smollm2_weights if in_stage.match(name)}
    assert set(stage) == expected and len(expected) == 10 * 9
    assert len(calls) == len(expected)
    for name, tensor in stage.items():
        assert torch.equal(tensor, smollm2_weights[name]), name


# --------------------------------------------------------------------------- tiny GGUFs


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_equals_transformers(tiny_dir, tensor_type):
    path = make_gguf_model(tiny_dir / f"llama-{tensor_type}.gguf", tensor_type=tensor_type, **TINY)
    assert gguf_tensor_types(path) == {tensor_type, "F32"}
    assert_same_as_transformers(dict(iter_weights(path, load_spec(path))), transformers_state_dict(path), tied=False)


@pytest.mark.parametrize("tensor_type", K_QUANTS)
def test_k_quants_equal_raw_dequantize_and_transformers(tiny_dir, tensor_type):
    path = make_gguf_model(tiny_dir / f"llama-{tensor_type}.gguf", tensor_type=tensor_type, **TINY, **K_QUANT_SHAPES)
    assert gguf_tensor_types(path) == {tensor_type, "F32"}
    ours = dict(iter_weights(path, load_spec(path)))
    assert all(torch.isfinite(t).all() for t in ours.values())
    assert_same_as_transformers(ours, transformers_state_dict(path), tied=False)

    raw = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    expected = gguf_dequantize(raw.data, GGMLQuantizationType[tensor_type])
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(expected))
    assert expected.std() > 0.01  # the random blocks are not all zeros


def test_llama_qk_rows_are_unpermuted(tiny_dir):
    # Independent of transformers: permuting our Q/K back as llama.cpp does gives the file's rows.
    path = make_gguf_model(tiny_dir / "llama-permute.gguf", tensor_type="F32", **TINY)
    ours = dict(iter_weights(path, load_spec(path)))
    raw = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    q, k = ours["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(q.numpy(), raw["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(llama_cpp_permute(q.numpy(), 4), raw["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(llama_cpp_permute(k.numpy(), 2), raw["blk.0.attn_k.weight"])


def test_qwen2_gguf_is_not_unpermuted_and_has_biases(tiny_dir):
    path = make_gguf_model(tiny_dir / "qwen2.gguf", "qwen2", tensor_type="F16", tie_word_embeddings=True, **TINY)
    spec = load_spec(path)
    assert (spec.architecture, spec.qkv_bias, spec.tie_word_embeddings) == ("qwen2", True, True)
    ours = dict(iter_weights(path, spec))
    assert "model.layers.1.self_attn.k_proj.bias" in ours
    assert_same_as_transformers(ours, transformers_state_dict(path), tied=True)


def test_gguf_header_is_parsed_once_per_file(tiny_dir, monkeypatch):
    path = make_gguf_model(tiny_dir / "parse-once.gguf", **TINY)
    opened = []
    monkeypatch.setattr(loader, "GGUFReader", lambda p: opened.append(p) or GGUFReader(p))
    list(iter_weights(path, load_spec(path)))
    load_spec(path)
    assert len(opened) == 1


def test_tiny_gguf_spec_and_tokenizer_ids(tiny_dir):
    path = make_gguf_model(tiny_dir / "with-tokenizer.gguf", num_layers=3, num_heads=8, num_kv_heads=4)
    spec = load_spec(path)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (3, 8, 4, 8)
    assert (spec.vocab_size, spec.bos_token_id, spec.eos_token_ids) == (49152, 1, (2,))
    assert not spec.tie_word_embeddings and "lm_head.weight" in dict(iter_weights(path, spec, lambda n: "lm_head" in n))


def test_gguf_rope_scaling(tiny_dir):
    linear = make_gguf_model(tiny_dir / "linear.gguf", rope_scaling={"rope_type": "linear", "factor": 2.0}, **TINY)
    assert load_spec(linear).rope_scaling == RopeScaling("linear", 2.0)

    llama3 = make_gguf_model(tiny_dir / "llama3.gguf", rope_scaling=LLAMA3_ROPE, **TINY)
    spec = load_spec(llama3)
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert "rope_freqs.weight" not in {name for name, _ in iter_weights(llama3, spec)}

    unusual = make_gguf_model(tiny_dir / "llama3-low2.gguf", rope_scaling=LLAMA3_ROPE | {"low_freq_factor": 2.0}, **TINY)
    with pytest.raises(ValueError, match="rope_freqs"):
        load_spec(unusual)


# --------------------------------------------------------------------------- Hugging Face directories


def test_hf_llama_spec_matches_config(hf_llama):
    config = json.loads((hf_llama / "config.json").read_text())
    spec = load_spec(hf_llama)
    assert spec.architecture == "llama" and not spec.qkv_bias and not spec.tie_word_embeddings
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size) == (
        config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    )
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    assert (spec.rms_norm_eps, spec.rope_theta, spec.max_position) == (1e-5, 10000.0, 2048)
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))


def test_hf_qwen2_spec_matches_config(hf_qwen2):
    spec = load_spec(hf_qwen2)
    assert (spec.architecture, spec.qkv_bias, spec.tie_word_embeddings) == ("qwen2", True, True)
    assert (spec.num_layers, spec.rope_scaling) == (3, None)


@pytest.mark.parametrize("model", ["hf_llama", "hf_qwen2"])
def test_hf_weights_equal_saved_state_dict(model, request):
    path = request.getfixturevalue(model)
    saved = load_file(path / "model.safetensors")
    ours = dict(iter_weights(path, load_spec(path)))
    assert set(ours) == set(saved)
    assert all(torch.equal(ours[name], saved[name]) for name in saved)
    assert ("lm_head.weight" in ours) == (model == "hf_llama")
    assert ("model.layers.0.self_attn.q_proj.bias" in ours) == (model == "hf_qwen2")


def test_hf_wanted_filters(hf_qwen2):
    names = [name for name, _ in iter_weights(hf_qwen2, load_spec(hf_qwen2), lambda n: n.startswith("model.layers.2."))]
    assert names and all(name.startswith("model.layers.2.") for name in names)


def test_hf_generation_config_eos_ids_are_added(hf_llama, tmp_path):
    shutil.copy(hf_llama / "config.json", tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_spec(tmp_path).eos_token_ids == (2, 0)


# --------------------------------------------------------------------------- unsupported input


def test_unsupported_tensor_type_is_named(tiny_dir):
    path = make_gguf_model(tiny_dir / "q5_0.gguf", tensor_type="Q5_0", **TINY)
    with pytest.raises(ValueError, match=r"'token_embd\.weight' has type Q5_0"):
        list(iter_weights(path, load_spec(path)))


def test_unsupported_gguf_architecture_is_named(tmp_path):
    writer = GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'phi3'"):
        load_spec(tmp_path / "phi.gguf")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "gpt_neox"}, "'gpt_neox'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_hf_config_is_named(hf_llama, tmp_path, change, named):
    config = json.loads((hf_llama / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        load_spec(tmp_path)


def test_mistral_context_is_capped_at_its_sliding_window(tmp_path):
    model_dir = make_hf_model(tmp_path / "mistral", "mistral")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(sliding_window=64, max_position_embeddings=4096)
    (model_dir / "config.json").write_text(json.dumps(config))
    assert load_spec(model_dir).max_position == 64
