"""The scheduling core must stay importable without torch (a fresh interpreter, so that other
tests that import torch do not mask an import of it here)."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import hetserve.core, hetserve.config, hetserve.sampling_params
assert "torch" not in sys.modules, "importing hetserve.core or hetserve.config imported torch"
"""


def test_core_and_config_import_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
