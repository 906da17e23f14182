"""The log-prob pass with a shared prefix (saev_core.model.logprobs) gives the values of one full
forward per response, on real transformers model classes of every tested family, and costs about
one forward per sample (issue 20: <= 1.3 on the toy model)."""

import pytest

from saev_core.model.logprobs import LogprobCost, pair_logprobs
from saev_core.model.mllm import MLLMAdapter
from saev_core.model.logprobs import response_logprob
from tiny_mllms import BUILDERS, random_image

PAIRS = [("what colour is the circle ?", "red circle", "blue square"),
         ("is there a red square ?", "yes there is a red square", "no"),
         ("describe the image .", "a green shape", "a red circle and a blue square")]


def _reference(adapter, image, prompt, responses):
    return [response_logprob(adapter, [image], [prompt], [r], mean=True)[0] for r in responses]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_shared_prefix_equals_full_forwards(family, tmp_path):
    adapter = MLLMAdapter.from_pretrained(str(BUILDERS[family](tmp_path / family)), layer=1, device="cpu")
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        image = random_image(i, 32 + 16 * i)
        got, cost = pair_logprobs(adapter, image, prompt, (chosen, rejected))
        assert got == pytest.approx(_reference(adapter, image, prompt, (chosen, rejected)), abs=2e-4)
        # Chameleon's processor appends a separator after the text, so its prompt is no prefix of the
        # full sequence: it takes the reference path; every other family's template continues it
        assert cost.fallbacks == (1 if family == "chameleon" else 0), family


def test_toy_model_costs_at_most_1_3_forwards_per_sample():
    from saev_core.toyworld import toy_model_path
    from saev_core.toyworld.generator import write_preference_dataset

    import io
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(write_preference_dataset(Path(tempfile.mkdtemp()) / "t", 8, seed=4)["parquet"]).to_pylist()
    adapter = MLLMAdapter.from_pretrained(str(toy_model_path()), layer=2, device="cpu")
    total = LogprobCost()
    for r in rows:
        image = Image.open(io.BytesIO(r["image"]["bytes"]))
        got, cost = pair_logprobs(adapter, image, r["question"], (r["chosen"], r["rejected"]))
        assert got == pytest.approx(_reference(adapter, image, r["question"], (r["chosen"], r["rejected"])), abs=2e-4)
        total.add(cost)
    assert total.fallbacks == 0
    assert 1.0 < total.forwards_per_sample <= 1.3  # was 2 full forwards (and a log-softmax over every position)


def test_sample_longer_than_the_context_takes_the_reference_path(tmp_path):
    """A response that does not fit is cut by the context budget as before: same values as the
    reference path, counted as a fallback."""
    adapter = MLLMAdapter.from_pretrained(str(BUILDERS["llava"](tmp_path / "llava")), layer=1, device="cpu")
    image = random_image(0)
    prompt, chosen, rejected = PAIRS[0]
    n = adapter.build_inputs([image], [prompt])["attention_mask"].shape[1]
    adapter.max_tokens = n + 3
    long = " ".join(["red circle"] * 20)
    got, cost = pair_logprobs(adapter, image, prompt, (long, rejected))
    assert cost.fallbacks == 1
    assert got == pytest.approx(_reference(adapter, image, prompt, (long, rejected)), abs=1e-6)
