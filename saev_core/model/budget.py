"""Token budgets: no sample longer than the model's context, no forward pass larger than a budget.

One 50,000-character question must neither crash a run nor blow up its memory. Two rules:

* :func:`fit_to_context`: a sample longer than the context (the model's
  ``max_position_embeddings``, or a smaller ``adapter.max_tokens``) has its text cut at the end,
  the prompt first and then the response, until it fits. The image tokens are never cut (the
  chat template places them; only text is shortened). The number of tokens dropped is kept per
  sample (``batch.truncated_tokens``; ``SampleActivations.truncated_tokens``).
* :func:`token_batches`: samples are grouped so that a batch's padded size (samples x longest
  sample) stays under ``batch_tokens``; a long sample runs in a small batch (alone if need be).
  :func:`capture_stream` groups a shard's samples by length first and prepares the next batch's
  inputs while the current one runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

from PIL import Image

from saev_core.model.errors import MLLMError

__all__ = ["context_tokens", "fit_to_context", "sample_lengths", "estimated_length", "stream_lengths", "token_batches",
           "capture_stream", "capture_bounded"]

_MAX_ROUNDS = 4  # decode/encode round trips are not always exact: cut again if still too long


def context_tokens(adapter) -> int | None:
    """The longest input the adapter accepts: ``adapter.max_tokens`` if set, capped by the
    language model's ``max_position_embeddings``; None when neither is known."""
    cfg = adapter.model.config
    ctx = getattr(getattr(cfg, "text_config", None) or cfg, "max_position_embeddings", None)
    limits = [v for v in (getattr(adapter, "max_tokens", None), ctx) if v]
    return min(limits) if limits else None


def _cut(tokenizer, text: str, n: int) -> tuple[str, int]:
    """``text`` without its last ``n`` tokens (at most all of them); returns (text, dropped)."""
    if n <= 0 or not text:
        return text, 0
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    k = min(n, len(ids))
    return tokenizer.decode(ids[: len(ids) - k], skip_special_tokens=False).strip(), k


def fit_to_context(adapter, batch, images: Sequence[Image.Image], prompts: Sequence[str],
                   responses: Sequence[str] | None, _round: int = 0, processor=None):
    """``batch`` if every sample fits the context; else the batch rebuilt from texts cut to fit.
    Sets ``batch.truncated_tokens`` (tokens dropped per sample) and ``batch.fitted_prompts``
    (the prompts as used, to find where the response starts)."""
    limit = context_tokens(adapter)
    lengths = batch["attention_mask"].sum(1).tolist()
    batch.truncated_tokens = [0] * len(lengths)
    batch.fitted_prompts = list(prompts)
    if limit is None or max(lengths) <= limit:
        return batch
    tok = getattr(processor or adapter.processor, "tokenizer", None)
    if tok is None or _round >= _MAX_ROUNDS:
        raise MLLMError(f"a sample of {max(lengths)} tokens does not fit the context of {limit} tokens")
    prompts, dropped = list(prompts), [0] * len(lengths)
    responses = None if responses is None else list(responses)
    for i, n in enumerate(lengths):
        excess = n - limit
        if excess <= 0:
            continue
        prompts[i], k = _cut(tok, prompts[i], excess)
        dropped[i] += k
        if responses is not None and excess > k:
            responses[i], k2 = _cut(tok, responses[i], excess - k)
            dropped[i] += k2
        if dropped[i] == 0:
            raise MLLMError(f"sample {i} of the batch needs {n} tokens, {excess} more than the context of "
                            f"{limit}, and has no text left to cut: its image alone is too long")
    rebuilt = adapter.build_inputs(images, prompts, responses, _fit_round=_round + 1, processor=processor)
    rebuilt.truncated_tokens = [a + b for a, b in zip(dropped, rebuilt.truncated_tokens)]
    return rebuilt


def sample_lengths(adapter, images: Sequence[Image.Image], prompts: Sequence[str],
                   responses: Sequence[str] | None = None) -> list[int]:
    """Token length of each sample after fitting to the context (each one processed alone)."""
    out = []
    for i in range(len(prompts)):
        batch = adapter.build_inputs(images[i:i + 1], prompts[i:i + 1],
                                     None if responses is None else responses[i:i + 1])
        out.append(int(batch["attention_mask"].sum()))
    return out


def token_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of sample indices with at most ``batch_size`` samples and at most
    ``batch_tokens`` padded tokens (group size x longest in group); a sample longer than the
    budget forms a group of its own."""
    groups: list[list[int]] = []
    group: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if group and (len(group) + 1 > batch_size or (len(group) + 1) * grown > batch_tokens):
            groups.append(group)
            group, grown = [], n
        group.append(i)
        longest = grown
    if group:
        groups.append(group)
    return groups


def estimated_length(adapter, image: Image.Image, prompt: str, response: str | None = None) -> int | None:
    """A sample's token length without running the image processor: the tokenizer's count of the
    templated text plus the image positions its placeholder expands into, which the processor
    derives from the image size alone (transformers' ``_get_num_multimodal_tokens``), capped by
    the context. None when the processor cannot say (then the exact length is measured)."""
    proc = adapter.processor
    tok = getattr(proc, "tokenizer", None)
    count = getattr(proc, "_get_num_multimodal_tokens", None)
    if tok is None or count is None:
        return None
    try:
        n_image = int(count(image_sizes=[(image.height, image.width)]).num_image_tokens[0])
    except Exception:  # noqa: BLE001 - a processor whose count needs more than the size: measure instead
        return None
    text = adapter.format_prompt(prompt, response)
    with adapter.text_lock:
        n_text = len(tok(text)["input_ids"])
    limit = context_tokens(adapter)
    n = n_text - 1 + n_image  # the one placeholder becomes the image's positions
    return min(n, limit) if limit else n


ESTIMATE_SLACK = 3  # tokens an estimate may miss by and still be used


def stream_lengths(adapter, n: int, load: Callable[[int], tuple], with_responses: bool = False) -> list[int]:
    """Token lengths of samples ``0..n-1`` for batching: estimates (:func:`estimated_length`) once
    the adapter's estimate has matched the processor on a first sample, else each sample measured
    through the processor. The check is made once per adapter: a processor release may count its
    image markup differently (Idefics3 in transformers 5.25), and then every length is measured."""
    out = []
    for i in range(n):
        image, prompt, response = load(i)
        response = response if with_responses else None
        trusted = getattr(adapter, "_length_estimates_ok", None)
        est = estimated_length(adapter, image, prompt, response) if trusted is not False else None
        if est is None or not trusted:
            exact = sample_lengths(adapter, [image], [prompt], None if response is None else [response])[0]
            if est is not None and trusted is None:
                adapter._length_estimates_ok = abs(est - exact) <= ESTIMATE_SLACK
            est = exact
        out.append(est)
    return out


def prefetch_workers() -> int:
    """Threads that build inputs ahead of the device: the cores less one for the device loop."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def capture_stream(adapter, n: int, load: Callable[[int], tuple], *, with_responses: bool = False,
                   batch_size: int = 8, batch_tokens: int = 8192, progress: Callable[[int], None] | None = None,
                   on_device: bool = False, prefetch: bool = True, out_dtype=None,
                   workers: int | None = None) -> Iterator[tuple[int, object]]:
    """Captures of samples ``0..n-1``, yielded as ``(index, SampleActivations)`` batch by batch.

    ``load(i)`` gives sample i's ``(image, prompt, response or None)``, so only a few batches'
    images are decoded at a time. Lengths are estimated first (tokenizer + image size: no image
    processor, :func:`stream_lengths`; measured where a processor cannot estimate); samples are
    then batched in length order (less padding), each batch at most ``batch_size`` samples and
    ``batch_tokens`` padded tokens, and each batch's inputs are built once. A batch whose real
    padded size exceeds the budget (an estimate too low) is split before it runs. With
    ``prefetch`` the next batches' inputs are built by ``workers`` threads (default: the cores
    less one), each with its own copy of the processor, while the current batch runs. The
    batches, and so the values, do not depend on ``prefetch``. ``out_dtype``: the dtype
    residuals leave the device in (off-device captures; default float32)."""
    lengths = stream_lengths(adapter, n, load, with_responses)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    groups = [[order[j] for j in g] for g in token_batches([lengths[i] for i in order], batch_size, batch_tokens)]
    extra = {} if out_dtype is None else {"out_dtype": out_dtype}

    def prepare(group: list[int], private: bool = True):
        items = [load(i) for i in group]
        images, prompts = [it[0] for it in items], [it[1] for it in items]
        responses = [it[2] for it in items] if with_responses else None
        proc = adapter.private_processor() if private else None
        return images, prompts, responses, adapter.build_inputs(images, prompts, responses, processor=proc)

    def run(group: list[int], prepared) -> Iterator[tuple[int, object]]:
        images, prompts, responses, batch = prepared
        padded = len(group) * int(batch.host_mask.sum(1).max())
        if padded > batch_tokens and len(group) > 1:  # the estimate was low: halves, built here
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                yield from run(part, prepare(part, private=False))
            return
        caps = adapter.capture(images, prompts, responses, on_device=on_device, batch=batch, **extra)
        yield from zip(group, caps)

    k = (workers or prefetch_workers()) if prefetch and groups else 0
    pool = ThreadPoolExecutor(k, thread_name_prefix="capture-prefetch") if k else None
    try:
        pending = [pool.submit(prepare, g) for g in groups[:k]] if pool else []
        for j, group in enumerate(groups):
            prepared = pending.pop(0).result() if pool else prepare(group, private=False)
            if pool and j + k < len(groups):
                pending.append(pool.submit(prepare, groups[j + k]))
            yield from run(group, prepared)
            if progress:
                progress(len(group))
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def capture_bounded(adapter, images: Sequence[Image.Image], prompts: Sequence[str],
                    responses: Sequence[str] | None = None, *, batch_size: int = 8, batch_tokens: int = 8192,
                    progress: Callable[[int], None] | None = None, on_device: bool = False) -> list:
    """``adapter.capture`` over all samples in token-bounded, length-grouped batches, results in
    input order (``on_device``: left on the model's device, for a fused pass)."""
    out: list = [None] * len(prompts)
    load = (lambda i: (images[i], prompts[i], None if responses is None else responses[i]))
    for i, cap in capture_stream(adapter, len(prompts), load, with_responses=responses is not None,
                                 batch_size=batch_size, batch_tokens=batch_tokens, progress=progress,
                                 on_device=on_device, prefetch=False):
        out[i] = cap
    return out
