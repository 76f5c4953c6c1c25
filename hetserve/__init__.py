"""hetserve: LLM serving on heterogeneous devices.

`import hetserve` stays light (no torch) so that `hetserve.core` can be used on its own;
the engine is imported on first use of `hetserve.LLM`.
"""

from hetserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from hetserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'hetserve' has no attribute {name!r}")
