"""Every supported model family, as a tiny random-weight Hugging Face folder loaded through
from_pretrained: the modality mask is the model's own placeholder mask, different images move the
image positions, Qwen-VL's hooked forward runs with the model's own M-RoPE positions, and the patch
geometry maps every image position to a region of the original image.

(Early-stop equality, padding, batch == one-by-one and responses run for every family in
test_mllm.py; the heatmap placement in test_patches.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_mllms import BUILDERS, random_image

from saev_core.model.image_geometry import EXTRA, NEWLINE, PATCH, GeometryError
from saev_core.model.mllm import MLLMAdapter
from saev_core.model.patches import PatchGeometry

PROMPTS = ["what colour is the circle ?", "is there a red square ?", "describe the image ."]
SIZES = [(32, 32), (64, 40), (40, 64), (100, 30), (96, 64)]
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CROPPED = {"llava", "chameleon"}  # a centre crop drops the sides of non-square images


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, MLLMAdapter.from_pretrained(str(folder), layer=2, device="cpu")


@torch.no_grad()
def test_modality_mask_is_the_models_placeholder_mask(family):
    """is_image marks exactly the positions the model fills with image features (the model checks
    their count against its image features), padding excluded."""
    name, adapter = family
    inner = adapter.model.model
    if not hasattr(inner, "get_placeholder_mask"):
        assert name == "idefics3"  # merges through inputs_merger; its mask is checked in test_mllm
        return
    seen = []
    original = inner.get_placeholder_mask

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        mask = out[0] if isinstance(out, tuple) else out
        seen.append(mask.any(-1) if mask.dim() == 3 else mask)
        return out

    images = [_image(i, *SIZES[i]) for i in range(3)]
    inner.get_placeholder_mask = recording
    try:
        batch = adapter.build_inputs(images, PROMPTS)
        adapter.model(**batch, use_cache=False)
        captured = adapter.capture(images, PROMPTS)
    finally:
        del inner.get_placeholder_mask
    model_mask = seen[0].cpu()
    attention = batch["attention_mask"].bool().cpu()
    assert not model_mask[~attention].any()  # the model never fills a padding position
    for i, sample in enumerate(captured):
        assert torch.equal(sample.is_image, model_mask[i][attention[i]]), f"{name} sample {i}"
        assert sample.n_image == int(model_mask[i].sum()) > 0


@torch.no_grad()
def test_different_images_move_the_image_positions(family):
    """The pixels reach the residual stream: two images, same prompt -> the image positions differ,
    the text before the image does not (causal attention)."""
    name, adapter = family
    a, b = adapter.capture([random_image(1), random_image(2)], PROMPTS[:1] * 2)
    assert torch.equal(a.is_image, b.is_image) and torch.equal(a.input_ids, b.input_ids)
    first = int(torch.nonzero(a.is_image)[0])
    torch.testing.assert_close(a.acts[:first], b.acts[:first])
    diff = (a.acts[a.is_image] - b.acts[b.is_image]).norm(dim=1)
    assert (diff > 1e-3).float().mean() > 0.5, f"{name}: the image barely changes the image positions"


@torch.no_grad()
def test_chameleon_mask_comes_from_placeholders_and_the_pixels_become_vq_codes(tmp_path):
    """Chameleon's image positions are VQ codes the model writes in place of the placeholders: the
    mask is read from the processor's input_ids (placeholders), and the embeddings at those
    positions are the embeddings of the image's own codes, not of the placeholder."""
    adapter = MLLMAdapter.from_pretrained(str(BUILDERS["chameleon"](tmp_path / "m")), layer=0, device="cpu")
    model = adapter.model.model
    image = random_image(3)
    batch = adapter.build_inputs([image], PROMPTS[:1])
    ids = batch["input_ids"][0]
    sample = adapter.capture([image], PROMPTS[:1])[0]
    placeholder = adapter.model.config.image_token_id
    assert sample.n_image == adapter.processor.image_seq_length == int((ids == placeholder).sum())
    assert bool((sample.input_ids[sample.is_image] == placeholder).all())
    codes = model.get_image_tokens(batch["pixel_values"])[0]
    assert codes.shape[0] == sample.n_image and not bool((codes == placeholder).any())
    got = {}
    def record(_module, args, kwargs):
        got["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = adapter.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        adapter.layer_output(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(got["h"][0][ids == placeholder], model.embed_tokens(codes))
    assert len(set(codes.tolist())) > 1, "the random VQ-GAN maps the whole image to one code"


@pytest.fixture(scope="module", params=QWEN)
def qwen(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, MLLMAdapter.from_pretrained(str(folder), layer=2, device="cpu")


@torch.no_grad()
def test_qwen_hook_runs_with_the_models_mrope_positions(qwen):
    """A batch mixing image sizes (different grids, different lengths, right padding): the hooked
    forward equals the full forward's hidden state at the layer, and the decoder saw the model's
    own 3-D rotary positions (get_rope_index), under which image tokens share a temporal index."""
    name, adapter = qwen
    images = [_image(0, 32, 32), _image(1, 64, 32), _image(2, 48, 48)]
    batch = adapter.build_inputs(images, PROMPTS)
    grids = batch["image_grid_thw"]
    assert len({tuple(g.tolist()) for g in grids}) == 3
    seen = {}
    lm = adapter.model.model.language_model
    def record(_module, _args, kwargs):
        seen["pos"] = kwargs["position_ids"]

    handle = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        captured = adapter.capture(images, PROMPTS)
    finally:
        handle.remove()
    own, _ = adapter.model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=grids,
        attention_mask=batch["attention_mask"])
    pos = seen["pos"]
    assert pos.dim() == 3 and pos.shape[-2:] == batch["input_ids"].shape
    torch.testing.assert_close(pos[-3:], own[-3:])  # Qwen3-VL may prepend a text row
    full = adapter.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[adapter.layer + 1]
    mask = batch["attention_mask"].bool()
    merge = adapter.processor.image_processor.merge_size
    for i, sample in enumerate(captured):
        torch.testing.assert_close(sample.acts, full[i][mask[i]])
        alone = adapter.capture(images[i:i + 1], PROMPTS[i:i + 1])[0]
        torch.testing.assert_close(alone.acts, sample.acts, atol=1e-5, rtol=1e-4)
        img = (batch["input_ids"][i] == adapter.image_token_id) & mask[i]
        t, h, w = own[-3][i][img], own[-2][i][img], own[-1][i][img]
        _, gh, gw = (int(v) for v in grids[i])
        assert len(set(t.tolist())) == 1
        assert len(set(h.tolist())) == gh // merge and len(set(w.tolist())) == gw // merge
    # the positions matter: 1-D positions give other activations (so the equality above can fail)
    plain = torch.arange(batch["input_ids"].shape[1]).expand(3, *batch["input_ids"].shape)
    other = adapter.model(**batch, position_ids=plain, output_hidden_states=True,
                          use_cache=False).hidden_states[adapter.layer + 1]
    assert not torch.allclose(other[mask], full[mask], atol=1e-4)


def test_geometry_maps_every_image_position_into_the_image(family):
    """For each size, the geometry has exactly the sample's image positions; every patch position
    is a non-empty box inside the original image, the rest are newline/extra positions, and the
    boxes cover the whole image (only a centre crop may leave the sides out)."""
    name, adapter = family
    geometry = PatchGeometry.from_adapter(adapter)
    for k, (width, height) in enumerate(SIZES):
        n_image = adapter.capture([_image(k, width, height)], PROMPTS[:1])[0].n_image
        geo = geometry.for_image(width, height, n_tokens=n_image)
        boxes = geo.boxes[geo.kinds == PATCH]
        assert set(np.unique(geo.kinds)) <= {PATCH, NEWLINE, EXTRA} and len(boxes) > 0
        eps = 1e-6
        assert (boxes[:, 0] >= -eps).all() and (boxes[:, 1] >= -eps).all(), f"{name} {width}x{height}"
        assert (boxes[:, 2] <= width + eps).all() and (boxes[:, 3] <= height + eps).all(), f"{name} {width}x{height}"
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        covered = geo.keep_mask(np.ones(geo.n_tokens, bool))
        crop_share = min(width, height) / max(width, height)  # what a centre crop keeps
        assert covered.all() or (name in CROPPED and covered.mean() >= crop_share - 0.05), f"{name} {width}x{height}"


def test_gemma3_pan_and_scan_is_a_clear_error(tmp_path):
    from transformers import AutoConfig

    from saev_core.model.families import load_processor

    folder = str(BUILDERS["gemma3"](tmp_path / "m"))
    processor = load_processor(folder, "gemma3")
    processor.image_processor.do_pan_and_scan = True
    geometry = PatchGeometry(AutoConfig.from_pretrained(folder), processor)
    with pytest.raises(GeometryError, match="gemma3: pan-and-scan crops are not mapped"):
        geometry.for_image(64, 40)


def test_video_processor_fallback_keeps_the_processor_class(tmp_path):
    """Without torchvision the Qwen/OneVision/InternVL processors load without their video part,
    as the model's own processor class (image + text code unchanged)."""
    import pickle

    from transformers import Qwen2VLProcessor

    from saev_core.model.families import images_only_processor, load_processor

    folder = str(BUILDERS["qwen2_vl"](tmp_path / "m"))
    processor = load_processor(folder, "qwen2_vl")
    assert isinstance(processor, Qwen2VLProcessor) and type(processor).__name__ == "Qwen2VLProcessor"
    assert "video_processor" not in type(processor).get_attributes()
    assert images_only_processor(Qwen2VLProcessor) is type(processor)
    copy = pickle.loads(pickle.dumps(processor))  # e.g. shipped to a Dask worker
    assert type(copy) is type(processor) and copy.image_processor.patch_size == 4


def test_readme_lists_every_family_with_geometry():
    from pathlib import Path

    from saev_core.model.families import FAMILIES
    from saev_core.model.patches import SUPPORTED_FAMILIES

    root = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
    text = (root / "README.md").read_text().split("## Model families", 1)[1]
    table = text.split("\n\n## ", 1)[0]
    for model_type in SUPPORTED_FAMILIES:
        assert f"`{FAMILIES[model_type].model_classes[0]}`" in table, model_type
    assert set(BUILDERS) == set(SUPPORTED_FAMILIES)  # every family with geometry has a tiny model here


def test_hub_layout_with_a_video_processor_config_loads_without_torchvision(tmp_path):
    """A Hub folder as Qwen publishes it (preprocessor_config.json + video_preprocessor_config.json,
    no processor_config.json): AutoProcessor fails on the video processor's torchvision import;
    the adapter's loader falls back to the same processor class without the video part."""
    import json

    from saev_core.model.families import load_processor

    folder = BUILDERS["qwen2_vl"](tmp_path / "m")
    combined = json.loads((folder / "processor_config.json").read_text())
    image_cfg = {**combined.pop("image_processor"), "processor_class": "Qwen2VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    video_cfg = {k: v for k, v in image_cfg.items() if k != "image_processor_type"}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {**video_cfg, "video_processor_type": "Qwen2VLVideoProcessor"}))
    (folder / "processor_config.json").unlink()
    adapter = MLLMAdapter.from_pretrained(str(folder), layer=1, device="cpu")
    assert type(adapter.processor).__name__ == "Qwen2VLProcessor"
    assert adapter.processor.image_processor.patch_size == 4 and adapter.processor.chat_template
    assert adapter.capture([random_image(0)], PROMPTS[:1])[0].n_image == 16
    assert type(load_processor(str(folder), "qwen2_vl")) is type(adapter.processor)


def test_cross_attention_family_is_a_clear_error(tmp_path):
    """Mllama feeds images through cross-attention: no image positions exist, so the adapter
    refuses it by name (from the config, before any weights are read)."""
    from transformers import MllamaConfig

    from saev_core.model.mllm import MLLMError

    MllamaConfig().save_pretrained(tmp_path)  # a config and no weights: the error must come first
    with pytest.raises(MLLMError, match=r"model type 'mllama' is not supported: images enter through "
                                        r"cross-attention"):
        MLLMAdapter.from_pretrained(str(tmp_path), layer=0, device="cpu")
