"""The one model-family registry: every family carries its input strategy and its patch-geometry
layout, a family missing a part fails when the registry module is imported, and the adapter and
the geometry read the same entries."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from saev_core.model import families
from saev_core.model.families import FAMILIES, ImageInput, Layout, NoGeometry, register_family
from saev_core.model.image_geometry import GeometryError
from saev_core.model.patches import _BUILDERS, SUPPORTED_FAMILIES, PatchGeometry


def _import_copy(tmp_path: Path, source: str):
    """Import `source` as a fresh module (what `import saev_core.model.families` does with it)."""
    path = tmp_path / "families_copy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("families_copy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_family_without_its_geometry_fails_at_import(tmp_path):
    source = Path(families.__file__).read_text()
    line = "                geometry=Layout.VQ_GRID)"
    assert source.count(line) == 1  # chameleon's registration
    _import_copy(tmp_path, source)  # the unchanged module imports
    with pytest.raises(TypeError, match="geometry"):
        _import_copy(tmp_path, source.replace(line, "                )"))
    with pytest.raises(TypeError, match="'chameleon': geometry must be a Layout"):
        _import_copy(tmp_path, source.replace(line, '                geometry="vq_grid")'))


def test_register_family_checks_every_part():
    def register(model_type="x", **parts):
        full = dict(name="X", model_classes=("XForConditionalGeneration",), images=ImageInput.FLAT,
                    geometry=Layout.CLIP_GRID, registry=registry)
        return register_family(model_type, **{**full, **parts})

    registry: dict = {}
    family = register()
    assert registry == {"x": family} and not family.nested_images
    with pytest.raises(ValueError, match="'x' is already registered"):
        register()
    with pytest.raises(TypeError, match="images must be an ImageInput"):
        register("y", images=True)
    with pytest.raises(TypeError, match="NoGeometry with the reason"):
        register("y", geometry=NoGeometry(""))
    with pytest.raises(ValueError, match="at least one model class"):
        register("y", model_classes=())
    assert list(registry) == ["x"]  # nothing half-registered


def test_geometry_and_adapter_read_the_same_registry():
    assert set(_BUILDERS) == set(Layout)  # every layout has a builder
    assert set(SUPPORTED_FAMILIES) == {t for t, f in FAMILIES.items() if isinstance(f.geometry, Layout)}
    assert {"smolvlm", "idefics2"} <= set(FAMILIES) - set(SUPPORTED_FAMILIES)
    assert FAMILIES["idefics3"].nested_images and not FAMILIES["llava"].nested_images
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type


@pytest.mark.parametrize("model_type", ["idefics2", "smolvlm", "not_a_family"])
def test_a_family_without_geometry_is_a_clear_error(model_type):
    reason = getattr(FAMILIES.get(model_type), "geometry", NoGeometry("supported are")).reason
    with pytest.raises(GeometryError, match=f"no patch geometry for model type '{model_type}': .*{reason[:20]}"):
        PatchGeometry(SimpleNamespace(model_type=model_type), processor=None)
