"""log p(chosen | image, prompt) and log p(rejected | image, prompt) at about the cost of one forward.

The image and the prompt are the same for both responses, and at LLaVA-NeXT shapes they are most
of the sequence (2,000+ image positions against a few dozen response tokens). So the shared
prefix (image + prompt + the template up to the response) runs once with the KV cache on and
only its last position's logits kept; the cache is then repeated for the two responses, which
run together as one batch of 2 over their own tokens only. Log-probabilities are gathered at the
response positions alone: no vocabulary-wide log-softmax over the prefix. The processor (the
image) runs once per sample; the responses only need the tokenizer.

A sample whose response tokens do not continue its prefix's tokens exactly (a tokenizer that
merges across the boundary, a processor that appends a token after the text, as Chameleon's
does), or that does not fit the context whole, takes the reference path
(`response_logprob` below: one full forward per response, with the context budget's
truncation), so the values are always those of the full sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from saev_core.model.budget import context_tokens, sample_lengths, token_batches
from saev_core.model.mllm import MLLMAdapter


@dataclass
class LogprobCost:
    """Positions the language model ran, against one full forward of (image, prompt, chosen)."""

    positions: int = 0  # every position run (prefix once, both responses, padding included)
    full_positions: int = 0  # what one full forward per sample of (prefix + chosen) would run
    fallbacks: int = 0  # samples that took the reference path

    @property
    def forwards_per_sample(self) -> float:
        return self.positions / self.full_positions if self.full_positions else float("nan")

    def add(self, other: "LogprobCost") -> None:
        self.positions += other.positions
        self.full_positions += other.full_positions
        self.fallbacks += other.fallbacks


def _suffix(tok, prefix_text: str, full_text: str) -> list[int] | None:
    """The tokens `full_text` adds after `prefix_text`, or None when its tokens do not start with
    the prefix's (then the prefix's cache is not the full sequence's)."""
    pre = tok(prefix_text)["input_ids"]
    full = tok(full_text)["input_ids"]
    if len(full) <= len(pre) or full[:len(pre)] != pre:
        return None
    return full[len(pre):]


def _ends_like_text(processed: list[int], text_ids: list[int], m: int = 4) -> bool:
    """Whether the processor's sequence ends with the text's own last tokens (nothing appended)."""
    m = min(m, len(text_ids))
    return m > 0 and processed[-m:] == text_ids[-m:]


@torch.no_grad()
def pair_logprobs(adapter, image, prompt: str, responses: tuple[str, str], mean: bool = True,
                  ) -> tuple[list[float], LogprobCost]:
    """[log p(responses[0]), log p(responses[1])] given (image, prompt): per-token means with
    `mean`, else sums. See the module docstring for how the prefix is shared."""
    tok = getattr(adapter.processor, "tokenizer", None)
    cost = LogprobCost()
    prefix_text = adapter.format_prompt(prompt)
    suffixes = [None, None]
    if tok is not None:
        with adapter.text_lock:
            suffixes = [_suffix(tok, prefix_text, adapter.format_prompt(prompt, r)) for r in responses]
    prefix = adapter.build_inputs([image], [prompt]) if all(s is not None for s in suffixes) else None
    n_prefix = int(prefix.host_mask.sum()) if prefix is not None else 0
    if prefix is not None and not _ends_like_text(prefix.host_ids[0][:n_prefix].tolist(),
                                                  tok(prefix_text)["input_ids"]):
        prefix = None  # the processor adds tokens after the text (Chameleon's separator): not a prefix
    limit = context_tokens(adapter)
    if (prefix is None or prefix.truncated_tokens[0]
            or (limit is not None and n_prefix + max(map(len, suffixes)) > limit)):
        values = [response_logprob(adapter, [image], [prompt], [r], mean=mean)[0] for r in responses]
        full = response_lengths(adapter, image, prompt, responses)
        return values, LogprobCost(sum(full), full[0], 1)
    dev = adapter.device
    width = max(map(len, suffixes))
    ids = torch.zeros(2, width, dtype=torch.long)  # host: built from the tokenizer's lists, copied once
    attn = torch.zeros(2, n_prefix + width, dtype=torch.long)  # host
    attn[:, :n_prefix] = 1
    for i, s in enumerate(suffixes):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)  # host
        attn[i, n_prefix:n_prefix + len(s)] = 1
    ids, attn = ids.to(dev, non_blocking=True), attn.to(dev, non_blocking=True)
    inputs = dict(prefix)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(adapter.dtype)
    with adapter.lock:
        try:
            out = adapter.model(**inputs, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model class without logits_to_keep: all the prefix's logits, last one used
            out = adapter.model(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(2)
        # transformers 5 renamed the argument `past_key_values` to `cache`; older classes take the old name
        name = "cache" if "cache" in inspect.signature(adapter.model.forward).parameters else "past_key_values"
        extra = {}
        deltas = getattr(getattr(adapter.model, "model", None), "rope_deltas", None)
        if deltas is not None:  # M-RoPE (Qwen-VL): text after the image continues at position + delta
            pos = torch.arange(n_prefix, n_prefix + width, device=dev)[None, :] + deltas.to(dev).reshape(-1, 1)
            extra["position_ids"] = pos.expand(3, 2, -1)
        cont = adapter.model(input_ids=ids, attention_mask=attn, use_cache=True, **{name: cache}, **extra)
    # position t of the responses is predicted by the prefix's last logit (t = 0) or by response
    # position t-1: only these 2 x width rows are normalised over the vocabulary
    logits = torch.cat([out.logits[:, -1:].expand(2, -1, -1), cont.logits[:, :-1]], 1).float()
    token_lp = logits.gather(-1, ids[:, :, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    valid = attn[:, n_prefix:].bool()
    total = (token_lp * valid).sum(1)
    values = (total / valid.sum(1).clamp_min(1)) if mean else total
    cost.positions = n_prefix + 2 * width
    cost.full_positions = n_prefix + len(suffixes[0])
    return values.tolist(), cost


def response_lengths(adapter, image, prompt: str, responses) -> list[int]:
    """Token lengths of the full sequences (image, prompt, response), as the reference path runs them."""
    return sample_lengths(adapter, [image] * len(responses), [prompt] * len(responses), list(responses))


@torch.no_grad()
def response_logprob(adapter: MLLMAdapter, images: Sequence, prompts: Sequence[str],
                     responses: Sequence[str], mean: bool = False, batch_size: int = 8,
                     batch_tokens: int = 8192) -> list[float]:
    """Sum (or, with `mean`, per-token mean) of log p(response tokens | image, prompt) under the
    full model: the model-based yardstick that SAE-based scores are compared with. Token-bounded
    batches (saev_core.model.budget); the reference that `pair_logprobs` matches."""
    lengths = sample_lengths(adapter, images, prompts, responses)
    out: list[float] = []
    for group in token_batches(lengths, batch_size, batch_tokens):
        out.extend(_response_logprob([images[i] for i in group], [prompts[i] for i in group],
                                     [responses[i] for i in group], adapter, mean))
    return out


def _response_logprob(images, prompts, responses, adapter: MLLMAdapter, mean: bool) -> list[float]:
    batch = adapter.build_inputs(images, prompts, responses)
    # the prompt as it was used (cut to the context, if it had to be) marks where the response starts
    prompt_only = adapter.build_inputs(images, batch.fitted_prompts)
    n_prompt = prompt_only["attention_mask"].sum(1)
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool()
    lp = torch.log_softmax(adapter.logits(batch)[:, :-1].float(), -1)
    token_lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(token t+1 | ..t)
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    in_response = (pos >= n_prompt[:, None]) & mask[:, 1:]
    total = (token_lp * in_response).sum(1)
    if mean:
        return (total / in_response.sum(1).clamp_min(1)).tolist()
    return total.tolist()
