"""`hetserve quantize`: write an int4 checkpoint (AWQ or round to nearest) that `serve` loads as is."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hetserve.config import DeviceConfig, EngineConfig, QuantizeConfig
from hetserve.flags import add_dataclass_flags, collect

logger = logging.getLogger(__name__)


def add_quantize_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="Quantize a model's layers to int4 (AWQ or round to nearest) "
                                                  "and write a checkpoint that serve loads.")
    add_dataclass_flags(parser, QuantizeConfig)
    add_dataclass_flags(parser, DeviceConfig)


def run_quantize(args: argparse.Namespace) -> int:
    config = QuantizeConfig(**collect(args, QuantizeConfig))
    device = DeviceConfig(**collect(args, DeviceConfig)).device
    print(quantize_model(config, device))
    return 0


def quantize_model(config: QuantizeConfig, device: str = "auto") -> Path:
    """Load the model in float32, search AWQ scales if asked, and write the int4 checkpoint; returns
    the checkpoint directory."""
    import torch
    from safetensors.torch import save_file

    from hetserve.model.awq import apply_awq, calibration_and_held_out_text, calibration_sequences
    from hetserve.model.int4_checkpoint import Int4CheckpointConfig, int4_checkpoint_tensors
    from hetserve.model.loader import export_tokenizer, hf_config, load_spec, load_tokenizer, resolve_model_path
    from hetserve.model.quantization import int4_group_size
    from hetserve.worker.worker import Worker

    checkpoint = Int4CheckpointConfig(config.method, config.group_size)
    output = _empty_output_dir(config.output)
    path = resolve_model_path(config.model)
    spec = load_spec(path)
    for in_features in (spec.hidden_size, spec.intermediate_size, spec.q_size):
        int4_group_size(in_features, config.group_size)  # fail before the search, not after
    model = Worker(spec, path, EngineConfig.from_kwargs(dtype="float32", device=device, quantization=None)).model
    if config.method == "awq":
        text, _ = calibration_and_held_out_text()
        tokens = load_tokenizer(path).encode(text, add_special_tokens=False)
        logger.info("searching AWQ scales on %d calibration tokens", config.calibration_tokens)
        apply_awq(model, calibration_sequences(tokens, config.calibration_tokens), config.group_size)
    output.mkdir(parents=True, exist_ok=True)
    save_file(int4_checkpoint_tensors(model, config.group_size), str(output / "model.safetensors"))
    model_config = hf_config(spec) | {"torch_dtype": str(torch.float32).removeprefix("torch."),
                                      "quantization_config": checkpoint.to_json()}
    (output / "config.json").write_text(json.dumps(model_config, indent=2))
    export_tokenizer(path, output)
    return output


def _empty_output_dir(output: str) -> Path:
    path = Path(output).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output {str(path)!r} exists and is not an empty directory")
    return path
