"""Plain-Python view of a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType


def _field_value(field) -> Any:
    """A metadata field as str, int, float, bool or a list of those."""
    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        if types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value


def read_metadata(source: str | Path | GGUFReader) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (tokenizer vocabulary included)."""
    reader = source if isinstance(source, GGUFReader) else GGUFReader(str(source))
    return {
        key: _field_value(field)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }
