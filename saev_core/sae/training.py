"""SAE glue: SAELens is the engine (training, checkpoints); this module adds the SAE-V recipe,
URI-aware load/save, and checks with clear errors. The data feed lives in saev_core.sae.feed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from saev_core.sae.feed import batch_provider

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
REQUIRED_TENSORS = ("W_enc", "W_dec", "b_dec")


class SAECheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the field."""


@dataclass
class SAETrainConfig:
    """Defaults are the SAE-V recipe (SAEV_METHOD.md section 1); steps/batch are scaled by caller."""

    architecture: str = "standard"  # one of ARCHITECTURES
    expansion_factor: int = 16
    d_sae: int | None = None  # overrides expansion_factor when set
    l1_coefficient: float = 5.0
    l1_warmup_frac: float = 0.05
    k: int = 32  # topk / batchtopk only
    lr: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_decay_frac: float = 0.2
    steps: int = 30_000
    batch_size: int = 4096  # tokens per step
    decoder_init_norm: float = 0.1
    normalize_activations: bool = True  # s = sqrt(d_in)/mean||x||, folded in at export
    n_batches_for_norm_estimate: int = 100
    # data: the recipe is one pass over RECIPE_TOKENS = 122.9M positions drawn across the dataset
    max_tokens: int | None = None  # positions drawn for training (saev_core.sae.feed); None = all cached
    max_samples: int | None = None  # and/or samples drawn, across every cached shard
    position_fraction: float = 1.0  # < 1: that share of each drawn sample's positions
    shuffle_buffer_tokens: int = 131_072  # mixing buffer (2 GB at d_in 4096 in float32)
    prefetch_batches: int = 4  # batches prepared ahead of the SAE step, in a background thread
    seed: int = 0
    device: str = "cpu"
    # "float32"; "tf32" (float32 weights, TF32 matmuls on a GPU); "bf16" (SAELens's autocast to
    # bfloat16, float32 weights and optimiser); "auto": bf16 on a GPU, float32 elsewhere
    precision: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_precision(self) -> str:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.precision == "auto":
            return "bf16" if str(self.device).startswith("cuda") else "float32"
        return self.precision


PRECISIONS = ("auto", "float32", "tf32", "bf16")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """TF32 matmuls for the block ("tf32"), the previous setting restored after."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


SAEV_RECIPE = SAETrainConfig()  # the paper's recipe (SAEV_METHOD.md section 1); specs override a few fields


def _standard_kwargs(cfg: SAETrainConfig) -> dict:
    # The method's encoder reads x_in directly (no b_dec subtraction before W_enc).
    return dict(l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=int(round(cfg.l1_warmup_frac * cfg.steps)),
                apply_b_dec_to_input=False)


def _k_kwargs(cfg: SAETrainConfig) -> dict:
    return dict(k=cfg.k)


# Architectures this project trains: the recipe-specific config fields of each. The classes come
# from SAELens's own registry (sae_lens.registry), so a name here is a SAELens architecture name.
_ARCHITECTURE_KWARGS: dict[str, Callable[[SAETrainConfig], dict]] = {
    "standard": _standard_kwargs, "topk": _k_kwargs, "batchtopk": _k_kwargs}
ARCHITECTURES = tuple(_ARCHITECTURE_KWARGS)


def _training_sae(cfg: SAETrainConfig, d_in: int):
    import sae_lens  # noqa: F401  (fills the registry)
    from sae_lens.registry import get_sae_training_class

    if cfg.architecture not in _ARCHITECTURE_KWARGS:
        raise ValueError(f"unknown SAE architecture {cfg.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    sae_class, config_class = get_sae_training_class(cfg.architecture)
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    return sae_class(config_class(
        d_in=d_in, d_sae=d_sae, device=cfg.device, decoder_init_norm=cfg.decoder_init_norm,
        normalize_activations="expected_average_only_in" if cfg.normalize_activations else "none",
        **_ARCHITECTURE_KWARGS[cfg.architecture](cfg)))


def train_sae(source: Callable[[], Iterable[torch.Tensor]], d_in: int, cfg: SAETrainConfig | None = None):
    """Train an SAE with SAELens' trainer on activations from `source` (see feed.batch_provider).

    Returns an inference `sae_lens.SAE` with the activation scale folded into its weights,
    so that it encodes raw residual vectors.
    """
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    cfg = cfg or SAETrainConfig()
    torch.manual_seed(cfg.seed)
    training_sae = _training_sae(cfg, d_in)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=0.0, lr_scheduler_name="constant", lr_warm_up_steps=0,
        lr_decay_steps=int(round(cfg.lr_decay_frac * cfg.steps)), adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, device=cfg.device, autocast=cfg.resolved_precision() == "bf16",
        dead_feature_window=max(1, cfg.steps // 4),
        feature_sampling_window=max(1, cfg.steps // 2), n_checkpoints=0, save_final_checkpoint=False,
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
    )
    provider = batch_provider(source, cfg.batch_size, cfg.shuffle_buffer_tokens, cfg.seed, cfg.device,
                              cfg.prefetch_batches)
    try:
        with matmul_precision(cfg.resolved_precision()):
            trained = SAETrainer(trainer_cfg, training_sae, provider).fit()
    finally:
        provider.close()  # stops the feed's background thread
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        return load_sae(tmp, device=cfg.device)


# ------------------------------------------------------------------ checkpoints
def _check_checkpoint(folder: Path, expected_d_in: int | None) -> dict:
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SAECheckpointError(f"SAE checkpoint {folder}: missing file {p.name}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise SAECheckpointError(f"SAE checkpoint {cfg_path}: not valid JSON ({exc})") from exc
    for field in ("d_in", "d_sae"):
        if not isinstance(cfg.get(field), int) or cfg[field] <= 0:
            raise SAECheckpointError(f"SAE checkpoint {cfg_path}: field {field!r} missing or not a positive int "
                                     f"(got {cfg.get(field)!r})")
    from safetensors import safe_open

    try:
        with safe_open(str(w_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise SAECheckpointError(f"SAE checkpoint {w_path}: unreadable safetensors file ({exc})") from exc
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for key in REQUIRED_TENSORS:
        if key not in shapes:
            raise SAECheckpointError(f"SAE checkpoint {w_path}: tensor {key!r} missing (has {sorted(shapes)})")
        if shapes[key] != want[key]:
            raise SAECheckpointError(f"SAE checkpoint {w_path}: tensor {key!r} has shape {shapes[key]}, "
                                     f"but {CFG_FILE} says d_in={d_in}, d_sae={d_sae} -> {want[key]}")
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAECheckpointError(f"SAE checkpoint {cfg_path}: field 'd_in' is {d_in} but the model's hidden "
                                 f"size at the hooked layer is {expected_d_in}")
    return cfg


def _local_copy(uri: str, storage_options: dict | None, stack: contextlib.ExitStack) -> Path:
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    for name in (CFG_FILE, WEIGHTS_FILE):
        src = f"{path.rstrip('/')}/{name}"
        if fs.exists(src):
            fs.get(src, str(tmp / name))
    return tmp


def load_sae(uri: str | Path, device: str = "cpu", expected_d_in: int | None = None,
             storage_options: dict | None = None, dtype: str | None = None):
    """Load a SAELens-format checkpoint (folder or URI), including SAELens 3.x-era configs such
    as the published SAE-V ones (their `expected_average_only_in` scale is already folded in).
    `dtype` ("float32", "bfloat16", ...): the dtype to encode in (default: the checkpoint's)."""
    from sae_lens import SAE

    with contextlib.ExitStack() as stack:
        folder = _local_copy(str(uri), storage_options, stack)
        cfg = _check_checkpoint(folder, expected_d_in)
        sae = SAE.load_from_disk(str(folder), device=device, dtype=dtype)
    if cfg.get("normalize_activations") == "expected_average_only_in":
        # Inference SAEs apply no runtime scale for this setting; record that it is folded.
        sae.cfg.normalize_activations = "none"
    return sae


def save_sae(sae, uri: str | Path, storage_options: dict | None = None) -> str:
    """Write cfg.json + sae_weights.safetensors to a folder or URI (SAELens inference format)."""
    uri = str(uri)
    if "://" not in uri or uri.startswith("file://"):
        folder = Path(uri.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        sae.save_model(folder)
        return str(folder)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        # weights first, config last: a reader that finds cfg.json finds complete weights
        for name in (WEIGHTS_FILE, CFG_FILE):
            fs.put(str(Path(tmp) / name), f"{path.rstrip('/')}/{name}")
    return uri


def encode(sae, acts: torch.Tensor, batch_size: int = 8192, on_device: bool = False) -> torch.Tensor:
    """Feature activations z for [n, d_in] residual vectors, in chunks to bound memory; on the
    CPU, or with `on_device` left on the SAE's device."""
    dev = next(sae.parameters()).device
    where = dev if on_device else torch.device("cpu")
    outs = []
    with torch.no_grad():
        for start in range(0, acts.shape[0], batch_size):
            outs.append(sae.encode(acts[start:start + batch_size].to(dev, sae.dtype)).float().to(where))
    return torch.cat(outs) if outs else torch.zeros(0, sae.cfg.d_sae, device=where)
