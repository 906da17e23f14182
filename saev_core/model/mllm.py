"""The MLLM adapter: load an image-text-to-text model, build batched inputs, and capture the
residual stream at one decoder layer, stopping the forward pass right after that layer.

Works through the generic Hugging Face classes (AutoModelForImageTextToText / AutoProcessor),
so any model whose processor expands an image placeholder into `image_token_id` positions
fits. What differs per family (processor loading, image nesting) lives in
saev_core.model.families; the tested families are listed there and in the README.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from saev_core.data.images import normalize_image
from saev_core.model import families
from saev_core.model.budget import fit_to_context
from saev_core.model.errors import MLLMError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook so that no compute is spent on later layers."""


@dataclass
class SampleActivations:
    """Residual vectors of one sample's real (non-padding) positions at the hooked layer."""

    acts: torch.Tensor  # [n_pos, d_model]: on the host in the capture's out_dtype, or on the device
    is_image: torch.Tensor  # [n_pos] bool: position is one of the expanded image tokens
    input_ids: torch.Tensor  # [n_pos]
    content: torch.Tensor | None = None  # [n_pos] bool: the prompt's (and response's) own text tokens
    truncated_tokens: int = 0  # text tokens cut to fit the context (saev_core.model.budget)

    @property
    def n_positions(self) -> int:
        return int(self.acts.shape[0])

    @property
    def n_image(self) -> int:
        return int(self.is_image.sum())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _require_local_folder(model_id: str) -> None:
    """A path-like id that is not a folder is a typo, not a Hub id: say so before transformers
    tries the Hub with it."""
    if (os.path.isabs(model_id) or model_id.startswith(".")) and not os.path.isdir(model_id):
        raise MLLMError(f"cannot load model {model_id!r}: no such local folder")


def model_hidden_size(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """Width of the language model's residual stream, from the config alone: an orchestrating
    process that only needs this number must not load (or download) the weights."""
    from transformers import AutoConfig

    _require_local_folder(model_id)
    try:
        cfg = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise MLLMError(f"cannot read the config of model {model_id!r}: {exc}") from exc
    return int(getattr(cfg, "text_config", cfg).hidden_size)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


def dtype_name(dtype: str) -> str:
    """The torch name of a dtype given as 'bfloat16', 'bf16', 'torch.float16', ..."""
    name = _DTYPE_ALIASES.get(dtype, dtype.removeprefix("torch."))
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise MLLMError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    return name


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the models' training dtype), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's stack of decoder layers, whatever the wrapper calls it."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for candidate in (decoder, getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise MLLMError(f"cannot find the decoder layers of {type(model).__name__}")


def _check_family(model_type: str, warn: bool = True) -> None:
    """A clear error for a family SAE-V cannot read; a warning for one no test covers."""
    try:
        families.check_supported(model_type)
    except families.UnsupportedFamily as exc:
        raise MLLMError(str(exc)) from None
    if warn and families.family_of(model_type) is None:
        log.warning("model type %r is not among the tested families (%s); image positions are taken as "
                    "input_ids == image_token_id", model_type, ", ".join(families.FAMILIES))


def image_token_id_of(model: torch.nn.Module, processor=None) -> int:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    value = getattr(processor, "image_token_id", None) if processor is not None else None
    if value is not None:
        return int(value)
    raise MLLMError(
        f"{type(model).__name__} has no image token (config has neither image_token_id nor "
        "image_token_index): SAE-V needs image positions in the token sequence"
    )


class MLLMAdapter:
    """One multimodal model + processor, hooked at decoder layer `layer` (0-based).

    The captured vector at layer L is that layer's output, i.e. `hidden_states[L + 1]`
    of a full forward with `output_hidden_states=True`.
    """

    def __init__(self, model, processor, layer: int, device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None):
        _check_family(getattr(model.config, "model_type", ""))
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = dtype or default_dtype(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.layers = decoder_layers(model)
        n = len(self.layers)
        if not -n <= layer < n:
            raise MLLMError(f"layer {layer} is outside the model: it has {n} decoder layers (0..{n - 1})")
        self.layer = layer % n
        self.image_token_id = image_token_id_of(model, processor)
        self.model_type = getattr(model.config, "model_type", "")
        self.max_tokens: int | None = None  # longest input; None: the model's context (budget.py)
        # Hooks live on the shared layer module: one forward at a time per adapter, or a hook
        # registered by one thread would capture (or stop) another thread's forward.
        self.lock = threading.RLock()
        # The processor's tokenizer is not thread-safe (a fast tokenizer's padding switch borrows it
        # mutably): inputs built on a prefetch thread and content masks made after a forward take
        # turns. The forward itself runs outside this lock, so the two overlap.
        self.text_lock = threading.RLock()
        self._local = threading.local()  # per-thread processor copies (private_processor)
        self._image_token_text = getattr(processor, "image_token", None) or "<image>"
        self._template_ids: dict[bool, list[int]] = {}
        self._markup_ids: list[int] | None = None
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            # Right padding keeps every real position's rotary position equal to its
            # unbatched one, so batched activations match single-sample ones.
            tok.padding_side = "right"

    @classmethod
    def from_pretrained(cls, model_id: str, layer: int, device: str = "auto", dtype: str | None = None,
                        revision: str | None = None, trust_remote_code: bool = False) -> "MLLMAdapter":
        """Load from a Hub id or a local folder. Remote code runs only if the caller asks."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        _require_local_folder(model_id)
        dev = resolve_device(device)
        if isinstance(dtype, str):
            torch_dtype = getattr(torch, dtype_name(dtype))
        else:
            torch_dtype = dtype or default_dtype(dev)
        try:
            config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
            _check_family(config.model_type, warn=False)  # before any weights are read
            model = AutoModelForImageTextToText.from_pretrained(
                model_id, config=config, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype)
            processor = families.load_processor(model_id, config.model_type, revision=revision,
                                                trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise MLLMError(f"cannot load model {model_id!r}: {exc}") from exc
        return cls(model, processor, layer, dev, torch_dtype)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(text_cfg.hidden_size)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # ---------------------------------------------------------------- inputs
    def format_prompt(self, prompt: str, response: str | None = None) -> str:
        """The model's chat template around (image, prompt[, response]). A literal image
        placeholder in the text (LLaVA-style data writes '<image>' where the picture goes; or the
        family's own image token) is removed: the image is placed by the template, and a second
        placeholder would break it."""
        token = self._image_token_text
        for placeholder in dict.fromkeys((token, "<image>")):  # the family's own and LLaVA-style data's
            if placeholder in prompt or (response is not None and placeholder in response):
                prompt = prompt.replace(placeholder, " ").strip()
                response = None if response is None else response.replace(placeholder, " ").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=response is None)
        tok = getattr(self.processor, "tokenizer", None)
        if getattr(tok, "chat_template", None):
            # a processor that cannot carry a template (ChameleonProcessor): the tokenizer's
            # text-only template, the image placeholder opening the user turn
            flat = [{"role": m["role"], "content": (token if m["role"] == "user" else "")
                     + "".join(c.get("text", "") for c in m["content"])} for m in messages]
            return tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=response is None)
        log.warning("processor has no chat template; using a plain '%s\\nprompt' layout", token)
        return f"{token}\n{prompt}" + (f" {response}" if response is not None else "")

    def private_processor(self):
        """This thread's own copy of the processor: input builders on a pool of threads run the
        (slow, PIL) image processor in parallel instead of taking turns on `text_lock`."""
        local = self._local
        if getattr(local, "processor", None) is None:
            with self.text_lock:
                local.processor = copy.deepcopy(self.processor)
        return local.processor

    def build_inputs(self, images: Sequence[Image.Image], prompts: Sequence[str],
                     responses: Sequence[str] | None = None, _fit_round: int = 0, processor=None):
        """Processor inputs of a batch; text cut to the context where needed (see
        saev_core.model.budget), with the tokens cut per sample in `batch.truncated_tokens`.
        `processor`: a private copy (`private_processor`), used without the shared lock."""
        if len(images) == 0:
            raise MLLMError("empty batch: no samples to run")
        if len(images) != len(prompts) or (responses is not None and len(responses) != len(prompts)):
            raise MLLMError(f"batch fields differ in length: {len(images)} images, {len(prompts)} prompts"
                            + (f", {len(responses)} responses" if responses is not None else ""))
        texts = [self.format_prompt(p, None if responses is None else r)
                 for p, r in zip(prompts, responses or [None] * len(prompts))]
        imgs = [normalize_image(im) for im in images]
        family = families.family_of(self.model_type)
        if family is not None and family.nested_images:
            imgs = [[im] for im in imgs]
        with self.text_lock if processor is None else contextlib.nullcontext():
            batch = (processor or self.processor)(images=imgs, text=texts, return_tensors="pt", padding=True)
            batch = fit_to_context(self, batch, images, prompts, responses, _fit_round, processor)
        return self.to_device(batch)

    def to_device(self, batch):
        """The batch on the model's device. The host's ids and attention mask are kept
        (`batch.host_ids`, `batch.host_mask`): modality and content masks are made from them with
        no copy back from the device. On a GPU the tensors are pinned and copied without blocking,
        so a batch prepared on a prefetch thread overlaps the running forward."""
        if getattr(batch, "host_ids", None) is None:
            batch.host_ids = batch["input_ids"]
            batch.host_mask = batch["attention_mask"].bool()
        if self.device.type != "cuda":
            return batch.to(self.device)
        for k, v in list(batch.items()):
            if isinstance(v, torch.Tensor) and v.device.type == "cpu":
                batch[k] = v.pin_memory().to(self.device, non_blocking=True)
        return batch

    def _forward(self, batch) -> None:
        inputs = dict(batch)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.model(**inputs, use_cache=False)

    # --------------------------------------------------------------- capture
    @torch.no_grad()
    def layer_output(self, batch) -> torch.Tensor:
        """[batch, seq, d_model] output of the hooked layer; the forward stops there."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_module, _inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        with self.lock:
            handle = self.layers[self.layer].register_forward_hook(hook)
            try:
                self._forward(batch)
            except _StopForward:
                pass
            finally:
                handle.remove()
        if "h" not in captured:
            raise MLLMError(f"layer {self.layer} was never reached in the forward pass")
        return captured["h"]

    @torch.no_grad()
    def capture(self, images: Sequence[Image.Image], prompts: Sequence[str],
                responses: Sequence[str] | None = None, on_device: bool = False,
                batch=None, out_dtype: torch.dtype = torch.float32) -> list[SampleActivations]:
        """Per sample: the activations of its real positions and their modality.

        Off the device (the cache's path) the layer output is converted to `out_dtype` on the
        device and copied to the host once per batch. With `on_device` (the fused pass, which
        stores none) everything stays on the model's device in the model's dtype: residuals,
        modality and content masks (made on the host from the host's ids, one small copy per
        batch). `batch`: these samples' inputs from `build_inputs`, when prepared ahead (e.g.
        on another thread while the previous batch ran)."""
        if batch is None:
            batch = self.build_inputs(images, prompts, responses)
        hidden = self.layer_output(batch)
        ids, mask = batch.host_ids, batch.host_mask
        rows = range(ids.shape[0])
        content = torch.zeros_like(mask)  # host: filled from the tokenizer's view of the host ids
        with self.text_lock:
            for i in rows:
                content[i, mask[i]] = self.content_mask(ids[i][mask[i]], responses is not None)
        is_image = (ids == self.image_token_id) & mask
        for i in rows:
            if not bool(is_image[i].any()):
                raise MLLMError(f"sample {i} of the batch has no image positions after processing")
        if on_device:
            where, values = hidden.device, hidden
        else:
            where, values = torch.device("cpu"), hidden.to(out_dtype).cpu()
        host = torch.stack([is_image, content, mask])  # one copy of the three masks per batch
        dev_image, dev_content, dev_mask = host.to(where, non_blocking=True).unbind(0)
        out = []
        for i in rows:
            n = int(mask[i].sum())
            prefix = bool(mask[i, :n].all())  # right padding: the real positions come first
            keep = slice(0, n) if prefix else dev_mask[i]
            out.append(SampleActivations(values[i][keep].contiguous(), dev_image[i][keep], ids[i][mask[i]],
                                         dev_content[i][keep], batch.truncated_tokens[i]))
        return out

    def _markup(self) -> list[int]:
        """Special and added tokens (image markup such as Idefics3's <row_1_col_1>, Chameleon's
        separator): never content."""
        if self._markup_ids is None:
            tok = getattr(self.processor, "tokenizer", None)
            added = getattr(tok, "added_tokens_decoder", None) or {}
            self._markup_ids = sorted(set(getattr(tok, "all_special_ids", None) or []) | {int(i) for i in added})
        return self._markup_ids

    def _template(self, with_response: bool) -> list[int]:
        """Token ids of the chat template around an empty prompt (and empty response), image
        placeholders and markup dropped."""
        if with_response not in self._template_ids:
            tok = getattr(self.processor, "tokenizer", self.processor)
            text = self.format_prompt("", "" if with_response else None)
            drop = set(self._markup()) | {self.image_token_id}
            self._template_ids[with_response] = [int(i) for i in tok(text)["input_ids"] if int(i) not in drop]
        return self._template_ids[with_response]

    def content_mask(self, input_ids: torch.Tensor, with_response: bool = False) -> torch.Tensor:
        """[n] bool: positions of the sample's own words. The plain-text positions (no image, special
        or added tokens, which processors insert around images or at the end) are compared with the
        template around an empty prompt: the common prefix and suffix are template, the middle is
        content. With a response appended, the template tokens between the prompt and the response
        (e.g. "assistant:") count as content."""
        tok = getattr(self.processor, "tokenizer", None)

        def norm(ids: list[int]) -> list:
            # a template word may tokenise with or without its leading space next to the prompt
            if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
                return ids
            return [str(t).lstrip(" \u0120\u2581") for t in tok.convert_ids_to_tokens(ids)]

        tmpl = norm(self._template(with_response))
        markup = torch.tensor(self._markup() + [self.image_token_id], dtype=input_ids.dtype, device=input_ids.device)
        text_pos = torch.nonzero(~torch.isin(input_ids, markup)).flatten()
        seq = norm(input_ids[text_pos].tolist()) if len(text_pos) else []
        limit = min(len(seq), len(tmpl))
        a = 0
        while a < limit and seq[a] == tmpl[a]:
            a += 1
        b = 0
        while b < limit - a and seq[-1 - b] == tmpl[-1 - b]:
            b += 1
        mask = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if len(text_pos):
            mask[text_pos[a:len(seq) - b]] = True
        return mask

    @contextlib.contextmanager
    def splice(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the hooked layer's output is replaced by `replace(output)` and the
        forward runs to the logits (used for spliced-in reconstruction loss)."""

        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (replace(output[0]),) + tuple(output[1:])
            return replace(output)

        with self.lock:
            handle = self.layers[self.layer].register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        inputs = dict(batch)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self.lock:
            return self.model(**inputs, use_cache=False).logits
