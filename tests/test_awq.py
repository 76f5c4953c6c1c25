"""AWQ int4 and int4 checkpoints: the scales cut the rounding error where activations have outlier
channels, folding them leaves the float model unchanged, and `hetserve quantize` writes a checkpoint
that loads back to exactly the in-memory quantized model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hetserve import LLM, SamplingParams
from hetserve.config import EngineConfig, QuantizeConfig
from hetserve.model.awq import (apply_awq, calibration_and_held_out_text, calibration_sequences, output_error,
                                search_scales)
from hetserve.model.int4_checkpoint import load_int4_linears, pack_int4, read_int4_config, unpack_int4
from hetserve.model.llama import LlamaForCausalLM, TensorShard
from hetserve.model.loader import load_spec, load_tokenizer
from hetserve.model.quantization import int4_fake_quantize, quantize_layers, quantize_lm_head
from hetserve.quantize import quantize_model
from hetserve.worker.worker import Worker
from tests.tiny_models import make_gguf_model, make_hf_model

GROUP = 32
CALIBRATION_TOKENS = 256


def float_model(path, **kwargs):
    return Worker(load_spec(path), path, EngineConfig.from_kwargs(dtype="float32", device="cpu", **kwargs)).model


def calibration(path) -> list[list[int]]:
    text, _ = calibration_and_held_out_text()
    tokens = load_tokenizer(path).encode(text[:20000], add_special_tokens=False)
    return calibration_sequences(tokens, CALIBRATION_TOKENS, sequence_len=128)


def logits(model, sequences: list[list[int]]) -> torch.Tensor:
    """Last-position logits of every sequence, run as one flat prefill batch."""
    from hetserve.model.awq import _flat_batch, _token_tensor

    batch = _flat_batch(model, sequences)
    with torch.inference_mode():
        hidden = model(_token_tensor(sequences, model), batch.positions, [batch.kv_cache] * model.num_layers,
                       batch.meta)
    ends = torch.tensor([sum(map(len, sequences[:i + 1])) - 1
                         for i in range(len(sequences))])
    return model.compute_logits(hidden[ends])


def test_awq_scales_cut_the_int4_error_of_inputs_with_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, [3, 77, 140, 201]] *= 40  # a few channels with large activations, as in real LLMs
    weight = torch.randn(192, 256) * 0.05
    gram = x.T @ x
    rtn_error = output_error(weight - int4_fake_quantize(weight, 128), gram)
    scales = search_scales(weight, gram, x.abs().mean(dim=0), 128)
    awq_error = output_error(weight - int4_fake_quantize(weight * scales, 128) / scales, gram)
    assert awq_error < 0.5 * rtn_error
    # The measure is the real output error.
    direct = (x @ weight.T - (x / scales) @ int4_fake_quantize(weight * scales, 128).T).pow(2).sum().item()
    assert direct == pytest.approx(awq_error, rel=1e-3)


@pytest.mark.parametrize("arch, kwargs", [("llama", {"num_kv_heads": 2}), ("llama", {"num_kv_heads": 4}),
                                          ("qwen2", {"num_kv_heads": 4})])
def test_folded_scales_leave_the_float_model_unchanged(tmp_path, arch, kwargs):
    # With as many KV heads as query heads the o_proj scales fold into v_proj (and Qwen2's v bias).
    path = make_hf_model(tmp_path / arch, arch, hidden_size=64, intermediate_size=128, **kwargs)
    model, sequences = float_model(path), calibration(path)
    before = logits(model, sequences)
    norm_before = model.layers[0].input_layernorm.weight.clone()
    apply_awq(model, sequences, GROUP, clip=False)
    assert not torch.equal(model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(logits(model, sequences), before, rtol=1e-4, atol=1e-4)


def test_awq_beats_round_to_nearest_on_a_model_with_outlier_channels(tmp_path):
    path = make_hf_model(tmp_path / "m", hidden_size=128, intermediate_size=256, num_layers=2)
    outliers = [5, 50, 99]

    def model_with_outliers():
        model = float_model(path)
        for layer in model.layers:
            layer.input_layernorm.weight[outliers] *= 30
            layer.post_attention_layernorm.weight[outliers] *= 30
        return model

    sequences = calibration(path)
    reference = logits(model_with_outliers(), sequences)
    rtn, awq = model_with_outliers(), model_with_outliers()
    apply_awq(awq, sequences, GROUP)
    errors = {}
    for name, model in (("rtn", rtn), ("awq", awq)):
        quantize_layers(model.layers, "int4", GROUP)
        errors[name] = (logits(model, sequences) - reference).pow(2).mean().item()
    assert errors["awq"] < 0.7 * errors["rtn"], errors


def test_int4_values_pack_two_to_a_byte_and_back():
    values = torch.randint(0, 16, (6, 64), dtype=torch.int32)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(unpack_int4(packed), values)


def test_checkpoint_loads_back_to_the_in_memory_quantized_model(tmp_path):
    path = make_hf_model(tmp_path / "m", "qwen2", hidden_size=64, intermediate_size=128)
    output = quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "q"), method="awq",
                                           group_size=GROUP, calibration_tokens=CALIBRATION_TOKENS), "cpu")
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                             "zero_point": True, "format": "hetserve-int4"}
    expected = float_model(path)
    text, _ = calibration_and_held_out_text()
    tokens = load_tokenizer(path).encode(text, add_special_tokens=False)
    apply_awq(expected, calibration_sequences(tokens, CALIBRATION_TOKENS), GROUP)
    quantize_layers(expected.layers, "int4", GROUP)
    quantize_lm_head(expected)  # as the engine does for every quantized model
    loaded = float_model(output)
    expected_state, loaded_state = expected.state_dict(), loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(loaded_state[name], tensor), name
    sequences = calibration(path)[:2]
    torch.testing.assert_close(logits(loaded, sequences), logits(expected, sequences), rtol=0, atol=0)


def hetserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetserve.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quantize_command_writes_a_model_that_generates(tmp_path):
    # From a GGUF file: the checkpoint carries the file's tokenizer and chat template along.
    source = make_gguf_model(tmp_path / "tiny.gguf")
    result = hetserve("quantize", "--model", str(source), "--output", str(tmp_path / "q"), "--method", "awq",
                      "--calibration-tokens", "512", "--group-size", "32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    llm = LLM(model=str(tmp_path / "q"), dtype="float32", kv_cache_memory="64MiB")
    original = load_tokenizer(source)
    assert llm.get_tokenizer().encode("Hello, world!") == original.encode("Hello, world!")
    assert llm.get_tokenizer().chat_template == original.chat_template
    output = llm.generate("The capital of France is", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(output[0].outputs[0].token_ids) == 6
    assert "--calibration-tokens" in hetserve("quantize", "--help").stdout


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gptq"}, "method must be awq or rtn"),
    ({"output": None}, "output is required"),
    ({"group_size": 100}, "group_size must be 128, 64 or 32"),
    ({"calibration_tokens": 0}, "calibration_tokens must be positive"),
])
def test_bad_quantize_settings_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**{"output": str(tmp_path / "q"), **kwargs})


def test_bad_quantize_inputs_are_clear_errors(tmp_path):
    path = make_hf_model(tmp_path / "m", hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "q")), "cpu")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "full")), "cpu")
    path = make_hf_model(tmp_path / "m64", hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="calibration needs"):
        quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "q"), calibration_tokens=10**7), "cpu")
    assert not (tmp_path / "q").exists()


def test_int4_checkpoint_refuses_foreign_formats_and_requantization(tmp_path):
    path = make_hf_model(tmp_path / "m", hidden_size=64, intermediate_size=128)
    output = quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "q"), method="rtn",
                                           group_size=GROUP), "cpu")
    with pytest.raises(ValueError, match="int4 checkpoint already"):
        float_model(output, quantization="int8")
    spec = load_spec(output)
    with torch.device("meta"):
        shard = LlamaForCausalLM(spec, shard=TensorShard((0, 1), (0, spec.intermediate_size // 2)))
    with pytest.raises(ValueError, match="tensor parallelism"):
        load_int4_linears(shard, output, read_int4_config(output), torch.device("cpu"), torch.float32)
    config = json.loads((output / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        float_model(output)


def test_int4_checkpoint_splits_into_pipeline_stages(tmp_path):
    path = make_hf_model(tmp_path / "m", hidden_size=64, intermediate_size=128, num_layers=3)
    output = quantize_model(QuantizeConfig(model=str(path), output=str(tmp_path / "q"), method="rtn",
                                           group_size=GROUP), "cpu")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for stages in (1, 2):
        llm = LLM(model=str(output), dtype="float32", kv_cache_memory="16MiB", pipeline_parallel_size=stages,
                  distributed_executor_backend="local")
        tokens[stages] = llm.generate("The capital of France is", params)[0].outputs[0].token_ids
    assert tokens[1] == tokens[2] and len(tokens[1]) == 8
