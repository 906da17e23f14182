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

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

from PIL import Image

__all__ = ["context_tokens", "fit_to_context", "sample_lengths", "token_batches", "capture_stream", "capture_bounded"]

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
                   responses: Sequence[str] | None, _round: int = 0):
    """``batch`` if every sample fits the context; else the batch rebuilt from texts cut to fit.
    Sets ``batch.truncated_tokens`` (tokens dropped per sample) and ``batch.fitted_prompts``
    (the prompts as used, to find where the response starts)."""
    from saev_core.model.mllm import MLLMError

    limit = context_tokens(adapter)
    lengths = batch["attention_mask"].sum(1).tolist()
    batch.truncated_tokens = [0] * len(lengths)
    batch.fitted_prompts = list(prompts)
    if limit is None or max(lengths) <= limit:
        return batch
    tok = getattr(adapter.processor, "tokenizer", None)
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
    rebuilt = adapter.build_inputs(images, prompts, responses, _fit_round=_round + 1)
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


def capture_stream(adapter, n: int, load: Callable[[int], tuple], *, with_responses: bool = False,
                   batch_size: int = 8, batch_tokens: int = 8192, progress: Callable[[int], None] | None = None,
                   on_device: bool = False, prefetch: bool = True, out_dtype=None) -> Iterator[tuple[int, object]]:
    """Captures of samples ``0..n-1``, yielded as ``(index, SampleActivations)`` batch by batch.

    ``load(i)`` gives sample i's ``(image, prompt, response or None)``, so only one batch's
    images are decoded at a time. Lengths are measured first (one sample's inputs at a time);
    samples are then batched in length order (less padding), each batch at most ``batch_size``
    samples and ``batch_tokens`` padded tokens. With ``prefetch`` the next batch's inputs
    (image decoding, the processor) are prepared on a background thread while the current batch
    runs. The batches, and so the values, do not depend on ``prefetch``. ``out_dtype``: the dtype
    residuals leave the device in (off-device captures; default float32)."""
    lengths = []
    for i in range(n):
        image, prompt, response = load(i)
        lengths.append(sample_lengths(adapter, [image], [prompt], [response] if with_responses else None)[0])
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    groups = [[order[j] for j in g] for g in token_batches([lengths[i] for i in order], batch_size, batch_tokens)]

    def prepare(group: list[int]):
        items = [load(i) for i in group]
        images, prompts = [it[0] for it in items], [it[1] for it in items]
        responses = [it[2] for it in items] if with_responses else None
        return images, prompts, responses, adapter.build_inputs(images, prompts, responses)

    pool = ThreadPoolExecutor(1, thread_name_prefix="capture-prefetch") if prefetch and groups else None
    try:
        pending = pool.submit(prepare, groups[0]) if pool else None
        for k, group in enumerate(groups):
            images, prompts, responses, batch = pending.result() if pool else prepare(group)
            if pool and k + 1 < len(groups):
                pending = pool.submit(prepare, groups[k + 1])
            caps = adapter.capture(images, prompts, responses, on_device=on_device, batch=batch,
                                   **({} if out_dtype is None else {"out_dtype": out_dtype}))
            yield from zip(group, caps)
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
