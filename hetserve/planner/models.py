"""The model a plan or simulation is for. Planning needs shapes only, not weights, so besides any model
`serve` takes, `--model` may name a config.json (or a directory holding one) or a well-known
architecture, to plan for a model that is not on this machine."""

from __future__ import annotations

from pathlib import Path

from hetserve.model.spec import ModelSpec

# Shapes from each model's published config.json.
KNOWN_MODELS = {
    "llama-3-8b": ModelSpec("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, 8192, False),
    "llama-3-70b": ModelSpec("llama", 128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0, 8192, False),
    "mistral-7b": ModelSpec("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 1e-5, 1000000.0, 32768, False),
    "qwen2-7b": ModelSpec("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e-6, 1000000.0, 32768, False,
                          qkv_bias=True),
}


def planning_model(model: str | None) -> tuple[ModelSpec, str | None]:
    """Shapes of `model` (a known name, a config.json or its directory, or any model `serve` takes),
    and the path of its weights when the engine can load them here (None for shapes alone)."""
    from hetserve.model.loader import load_spec, resolve_model_path  # imports torch: only when asked

    if model is not None and model.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[model.lower()], None
    if model is not None:
        path = Path(model).expanduser()
        if path.name == "config.json" and path.is_file():
            return load_spec(path.parent), None
        if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
            return load_spec(path), None
    try:
        path = resolve_model_path(model)
    except ValueError as error:
        raise ValueError(f"{error}; for planning, --model may also be a config.json or one of "
                         f"{', '.join(KNOWN_MODELS)}") from None
    return load_spec(path), str(path)
