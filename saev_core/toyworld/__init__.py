"""The toy world: a small, fully known multimodal world for offline tests and benchmarks.

- ``generator``: scenes of coloured shapes (with pixel masks), captions, question/answer
  templates, and preference datasets (RLAIF-V / Align-Anything layouts) with labelled corruptions.
- ``model``: tokenizer, processor and configurations of the toy LLaVA, and ``evaluate``.
- ``train_model``: ``python -m saev_core.toyworld.train_model --out DIR --seed 0``.
- ``toy_model_path()``: the shipped, trained toy LLaVA (a standard Hugging Face folder).

Importing this package needs only numpy and PIL; torch/transformers load with ``model``.
"""

from __future__ import annotations

import pathlib
from importlib import resources

from .generator import (
    CORRUPTIONS,
    LAYOUTS,
    Scene,
    caption,
    make_preference_rows,
    render_scene,
    sample_example,
    sample_scene,
    write_preference_dataset,
)

TOY_MODEL_DIRNAME = "toy-llava"


def toy_model_path() -> pathlib.Path:
    """Folder of the shipped toy LLaVA (model + processor + toyworld.json), inside this package."""
    path = pathlib.Path(str(resources.files(__name__) / "assets" / TOY_MODEL_DIRNAME))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the toy model is missing at {path}; build it with "
            f"`python -m saev_core.toyworld.train_model --out {path} --seed 0`"
        )
    return path


def evaluate(model, processor, *args, **kwargs) -> dict:
    """Held-out answer accuracy per question kind: ``saev_core.toyworld.model.evaluate`` (its
    parameters and defaults), imported on first call so that this package stays torch-free."""
    from .model import evaluate as _evaluate

    return _evaluate(model, processor, *args, **kwargs)


__all__ = [
    "CORRUPTIONS", "LAYOUTS", "Scene", "caption", "evaluate", "make_preference_rows", "render_scene",
    "sample_example", "sample_scene", "toy_model_path", "write_preference_dataset",
]
