"""Patch geometry of each family, checked against the model's own image pipeline.

The ground truth comes from the model code, not from saev_core.model.patches: with the vision
tower's attention outputs zeroed, every vision position depends only on its own patch, so the
language model's input embedding at an image position changes only where that position's pixels
change. A "feature" = |embedding(image) - embedding(reference image)| therefore fires exactly on
the positions whose pixels differ; the image differs from the reference only on its left half,
so the geometry must put the feature's heatmap mass on the left half. The model's own packing
(LLaVA-NeXT's tiles, unpadding and newlines, Idefics3's crops and pixel shuffle, Qwen's merged
patches, Gemma 3's pooling, OneVision's downsampling, InternVL's tiles and thumbnail, Chameleon's
VQ grid) decides which position is which, so a wrong order, flip, transpose or offset in the
geometry fails here; the same is checked for a top half, so a vertical flip fails too.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_mllms import BUILDERS

from saev_core.model.image_geometry import NEWLINE, GeometryError, top_fraction
from saev_core.model.mllm import MLLMAdapter
from saev_core.model.patches import PatchGeometry

PROMPT = "what colour is the shape ?"
SIZES = {"llava": [(64, 40), (32, 32)], "llava_next": [(64, 40), (40, 64), (32, 32)],
         "idefics3": [(64, 48), (30, 100)], "chameleon": [(64, 40), (32, 32)],
         # Qwen: (80, 40) is shrunk by max_pixels to 64 x 32; every size gives an even token grid
         "qwen2_vl": [(64, 32), (32, 64), (80, 40)], "qwen2_5_vl": [(64, 32), (80, 40)],
         "qwen3_vl": [(48, 48), (80, 40)], "gemma3": [(64, 40), (32, 32)],
         # 96x64 and 64x96 are downsampled by OneVision's anyres_max_2 rule; 64x40 is not
         "llava_onevision": [(64, 40), (96, 64), (64, 96)],
         "internvl": [(64, 40), (30, 100), (32, 32)]}
CROPPED = {"llava", "chameleon"}  # a centre crop drops the sides of wide images
# attention output projections on the vision side (conv VQ-GAN for Chameleon)
_VISION_ATTN_OUT = re.compile(r"(vision|visual|vqmodel).*\.(out_proj|proj|projection_layer|proj_out)$")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module", params=list(BUILDERS))
def local_model(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    adapter = MLLMAdapter.from_pretrained(str(folder), layer=0, device="cpu")
    zeroed = 0
    for name, module in adapter.model.named_modules():
        if _VISION_ATTN_OUT.search(name) and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
            zeroed += 1
    assert zeroed > 0, "no vision attention projection found"
    if request.param == "chameleon":
        _local_vq_encoder(adapter.model.model.vqmodel)
    return request.param, adapter


def _local_vq_encoder(vqmodel) -> None:
    """Chameleon's VQ-GAN encoder normalises with GroupNorm (statistics over the whole image), so
    any pixel change moves every code. For the geometry check its encoder becomes an average pool
    to the latent grid; the model's own quantiser, code order (row-major over the latent grid), BPE
    mapping and the processor's resize + crop are what is tested."""
    enc = vqmodel.encoder
    factor = 2 ** (len(vqmodel.config.channel_multiplier) - 1)
    channels = vqmodel.quant_conv.in_channels

    def forward(pixel_values):
        pooled = torch.nn.functional.avg_pool2d(pixel_values, factor)
        return pooled.repeat(1, -(-channels // pooled.shape[1]), 1, 1)[:, :channels] * 10

    enc.forward = forward


@torch.no_grad()
def image_embeddings(adapter, image) -> torch.Tensor:
    """The language model's input vectors at the image positions, in sequence order."""
    batch = adapter.build_inputs([image], [PROMPT])
    got = {}

    def hook(_module, args, kwargs):
        got["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _Stop

    handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter._forward(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    ids = batch["input_ids"][0]
    return got["h"][0][ids == adapter.image_token_id].float()


def half_images(width: int, height: int, half: str = "left"):
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = (30, 60, 220)
    ref = Image.fromarray(arr.copy())
    region = np.s_[:, : width // 2] if half == "left" else np.s_[: height // 2, :]
    arr[region] = (220, 40, 30)
    return Image.fromarray(arr), ref, region


@pytest.mark.parametrize("half", ["left", "top"])
def test_half_image_feature_lands_on_that_half(local_model, half):
    family, adapter = local_model
    geometry = PatchGeometry.from_adapter(adapter)
    for width, height in SIZES[family]:
        image, ref, region = half_images(width, height, half)
        feature = (image_embeddings(adapter, image) - image_embeddings(adapter, ref)).norm(dim=1).numpy()
        assert feature.max() > 0, f"{family}: the image change moved no image position"
        geo = geometry.for_image(width, height, n_tokens=len(feature))
        heat = geo.heatmap(feature)
        assert heat.shape == (height, width)
        inside = heat[region].sum() / heat.sum()
        assert inside > 0.9, f"{family} {width}x{height}: only {inside:.2f} of the heatmap mass on the {half} half"
        for m, covered in geo.view_maps(feature):  # every view on its own, too
            assert covered.all() or family in CROPPED
            assert m[region].sum() / m.sum() > 0.85, f"{family} {width}x{height} {half}: a view misplaces it"
        if family in ("llava_next", "llava_onevision"):
            # newline positions cover no pixels, and the feature does not fire there
            nl = geo.kinds == NEWLINE
            assert nl.sum() > 0 and np.all(np.isnan(geo.boxes[nl]))
            assert feature[nl].max() < 1e-4 * feature.max()


def test_token_count_checked_and_unsupported_layout(local_model):
    family, adapter = local_model
    geometry = PatchGeometry.from_adapter(adapter)
    geo = geometry.for_image(64, 40)
    with pytest.raises(GeometryError, match="image positions"):
        geometry.for_image(64, 40, n_tokens=geo.n_tokens + 1)
    cfg = type("Cfg", (), {"model_type": "fuyu", "vision_config": None})()
    with pytest.raises(GeometryError, match="no patch geometry for model type 'fuyu'"):
        PatchGeometry(cfg, adapter.processor)


def test_coverage_keep_mask_and_top_fraction(tmp_path):
    geo = PatchGeometry.from_pretrained(str(BUILDERS["llava"](tmp_path / "llava"))).for_image(32, 32)  # 8x8 x 4px
    mask = np.zeros((32, 32), bool)
    mask[0:8, 0:4] = True  # patches (0,0) and (1,0) entirely
    cov = geo.coverage(mask)
    assert cov[0] == 1.0 and cov[8] == 1.0 and np.nansum(cov) == 2.0
    keep = top_fraction(np.arange(64, dtype=float), 0.25)
    assert keep.sum() == 16 and keep[48:].all()
    kept = geo.keep_mask(keep)
    assert kept[24:].all() and not kept[:24].any()
    tied = top_fraction(np.zeros(64), 0.5, seed=1)
    assert tied.sum() == 32
