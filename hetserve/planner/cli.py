"""`hetserve profile` and `hetserve plan`: measure this machine's devices, and place a model on
measured or hypothetical devices."""

from __future__ import annotations

from hetserve.model.spec import ModelSpec
from hetserve.planner.profile import ClusterProfile


def load_cluster(devices_file: str | None, spec: ModelSpec, refresh: bool = False) -> ClusterProfile:
    """The profile in `devices_file`, else this machine's, measured once for the model and cached."""
    if devices_file is not None:
        return ClusterProfile.load(devices_file)
    from hetserve.planner.profiler import cached_profile  # imports torch: only when measuring

    return cached_profile(spec, refresh=refresh)
