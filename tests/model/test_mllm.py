"""The MLLM adapter on real transformers model classes (tiny random configs, saved and loaded
through from_pretrained)."""

import pytest
import torch

from saev_core.model.mllm import MLLMAdapter, MLLMError
from tiny_mllms import BUILDERS, random_image

PROMPTS = ["what colour is the circle ?", "is there a red square ?", "describe the image ."]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("layer", [0, 2])
def test_early_stopped_hook_equals_full_forward(model_dir, layer):
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=layer, device="cpu")
    images = [random_image(i, 32 + 16 * i) for i in range(3)]
    batch = adapter.build_inputs(images, PROMPTS)
    full = adapter.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
    captured = adapter.capture(images, PROMPTS)
    mask = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    for i, sample in enumerate(captured):
        torch.testing.assert_close(sample.acts, full[i][mask[i]], atol=1e-5, rtol=1e-4)
        # padding excluded, modality mask exactly the image-token positions
        assert sample.n_positions == int(mask[i].sum())
        assert torch.equal(sample.is_image, ids[i][mask[i]] == adapter.image_token_id)
        assert 0 < sample.n_image < sample.n_positions
        assert not (sample.input_ids == adapter.processor.tokenizer.pad_token_id).any()


def test_forward_stops_at_the_hooked_layer(model_dir):
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=1, device="cpu")
    reached = []
    handles = [l.register_forward_hook(lambda m, i, o, k=k: reached.append(k)) for k, l in enumerate(adapter.layers)]
    adapter.capture([random_image(0)], PROMPTS[:1])
    for h in handles:
        h.remove()
    assert reached == [0, 1]


def test_batched_capture_equals_one_by_one(model_dir):
    """Right padding + attention masks: a sample's activations do not depend on its batch."""
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=2, device="cpu")
    images = [random_image(i) for i in range(3)]
    together = adapter.capture(images, PROMPTS)
    for i in range(3):
        alone = adapter.capture(images[i:i + 1], PROMPTS[i:i + 1])[0]
        torch.testing.assert_close(together[i].acts, alone.acts, atol=1e-4, rtol=1e-4)
        assert torch.equal(together[i].is_image, alone.is_image)


def test_response_appends_assistant_turn(model_dir):
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu")
    with_resp = adapter.capture([random_image(0)], PROMPTS[:1], ["red circle"])[0]
    without = adapter.capture([random_image(0)], PROMPTS[:1])[0]
    assert with_resp.n_positions > without.n_positions
    assert with_resp.n_image == without.n_image


def test_content_mask_is_the_prompts_own_words(model_dir):
    """Chat template, special tokens and image markup are not content; the prompt's words are."""
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu")
    tok = adapter.processor.tokenizer
    for sample, prompt in zip(adapter.capture([random_image(i) for i in range(3)], PROMPTS), PROMPTS):
        assert not (sample.content & sample.is_image).any()
        assert tok.decode(sample.input_ids[sample.content]).split() == prompt.split()
        assert tok.decode(sample.input_ids[~sample.content & ~sample.is_image]).strip()  # the template is left out
    with_resp = adapter.capture([random_image(0)], PROMPTS[:1], ["red circle"])[0]
    words = tok.decode(with_resp.input_ids[with_resp.content]).split()
    assert words[:len(PROMPTS[0].split())] == PROMPTS[0].split() and words[-2:] == ["red", "circle"]


def test_layer_outside_model_is_a_clear_error(model_dir):
    with pytest.raises(MLLMError, match=r"layer 4 is outside the model: it has 4 decoder layers"):
        MLLMAdapter.from_pretrained(str(model_dir), layer=4, device="cpu")


def test_empty_batch_is_a_clear_error(model_dir):
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu")
    with pytest.raises(MLLMError, match="empty batch"):
        adapter.capture([], [])


def test_model_without_image_token_is_a_clear_error(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = BUILDERS["llava"](tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    model.config.image_token_id = None
    processor.image_token_id = None
    with pytest.raises(MLLMError, match="has no image token"):
        MLLMAdapter(model, processor, layer=0, device="cpu")


def test_missing_model_folder_names_it(tmp_path):
    with pytest.raises(MLLMError, match="cannot load model"):
        MLLMAdapter.from_pretrained(str(tmp_path / "nope"), layer=0, device="cpu")


def test_literal_image_placeholder_in_prompt_is_removed(model_dir):
    """LLaVA-style data writes '<image>' in the question; the template places the image itself."""
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu")
    plain = adapter.capture([random_image(0)], ["what colour is the circle ?"])[0]
    marked = adapter.capture([random_image(0)], ["<image>\nwhat colour is the circle ?"])[0]
    assert marked.n_image == plain.n_image
    torch.testing.assert_close(marked.acts, plain.acts)


def test_dtype_names(model_dir):
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu", dtype="bf16")
    assert adapter.dtype == torch.bfloat16
    assert adapter.capture([random_image(0)], PROMPTS[:1])[0].acts.dtype == torch.float32
    with pytest.raises(MLLMError, match="unknown dtype 'float99'"):
        MLLMAdapter.from_pretrained(str(model_dir), layer=0, device="cpu", dtype="float99")


def test_hidden_size_from_config_alone_matches_the_loaded_model(model_dir):
    from saev_core.model.mllm import model_hidden_size

    assert model_hidden_size(str(model_dir)) == MLLMAdapter.from_pretrained(str(model_dir), layer=0).hidden_size


def test_hidden_size_of_a_missing_folder_names_it(tmp_path):
    from saev_core.model.mllm import model_hidden_size

    with pytest.raises(MLLMError, match="no-such-model"):
        model_hidden_size(str(tmp_path / "no-such-model"))
