"""Content-addressed, sharded cache of residual activations on any storage URI.

Layout under the cache root:

    <root>/<spec key>/spec.json                        what produced these activations
    <root>/<spec key>/<shard key>.safetensors          acts [tokens, d], is_image [tokens], offsets [samples+1],
                                                       content [tokens] (the prompt's own text tokens)
    <root>/<spec key>/<shard key>.index.parquet        one row per sample: sample_id, start, length, n_image
    <root>/<spec key>/<shard key>.done.json            written last: counts; marks the shard finished

The spec key hashes the model id + revision, layer, storage dtype and input formatting; the
shard key hashes the ordered sample ids in the shard. So the dataset's fingerprint is the set
of its shard keys: a rerun over the same data reuses every finished shard, new data only
computes new shards, and a shard without its `done.json` (a crash mid-write) is never read.
Per-position (sample_id, position, modality) is recoverable from the index + `is_image`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load, save

from saev_core.data import storage
from saev_core.model.mllm import SampleActivations, default_dtype, resolve_device

FORMAT_VERSION = 2  # 2: per-position content mask
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class CacheSpec:
    model_id: str
    layer: int
    revision: str | None = None
    storage_dtype: str = "float32"
    compute_dtype: str = "default"  # the model's dtype in the forward pass (bf16 and fp32 differ)
    response: str = "none"  # which response is appended after the prompt: none | chosen | rejected
    model_fingerprint: str = ""  # e.g. a hash of the local model folder's weights
    max_tokens: int | None = None  # inputs longer than this (or the context) had their text cut

    @classmethod
    def for_model(cls, model, response: str = "none", fingerprint: str = "") -> "CacheSpec":
        """The cache spec of a `ModelSpec`: its compute dtype is decided where the run is planned
        (the model spec's dtype, else the default of the device it names)."""
        compute = model.dtype or str(default_dtype(resolve_device(model.device))).removeprefix("torch.")
        return cls(model_id=model.model_id, layer=model.layer, revision=model.revision,
                   storage_dtype=model.cache_dtype, compute_dtype=compute, response=response,
                   model_fingerprint=fingerprint, max_tokens=getattr(model, "max_tokens", None))

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_key(sample_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:20]


@dataclass
class CachedShard:
    sample_ids: list[str]
    acts: torch.Tensor  # [tokens, d]
    is_image: torch.Tensor  # [tokens] bool
    offsets: torch.Tensor  # [samples + 1]
    content: torch.Tensor | None = None  # [tokens] bool: the prompt's own text tokens

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.sample_ids[i], self.acts[lo:hi], self.is_image[lo:hi]

    def samples(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self.sample(i)

    def sample_content(self, i: int) -> torch.Tensor | None:
        if self.content is None:
            return None
        return self.content[int(self.offsets[i]):int(self.offsets[i + 1])]

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


class ActivationCache:
    def __init__(self, root_uri: str, spec: CacheSpec, storage_options: dict | None = None):
        if spec.storage_dtype not in _DTYPES:
            raise ValueError(f"storage_dtype {spec.storage_dtype!r}: use one of {sorted(_DTYPES)}")
        self.spec = spec
        self.so = storage_options
        self.uri = storage.join(root_uri, spec.key())

    def _uri(self, key: str, suffix: str) -> str:
        return storage.join(self.uri, f"{key}{suffix}")

    def is_finished(self, key: str) -> bool:
        return storage.exists(self._uri(key, ".done.json"), self.so)

    def write_shard(self, samples: Sequence[tuple[str, SampleActivations]]) -> str:
        """Store one shard; returns its key. Done marker last, so readers never see half a shard."""
        if not samples:
            raise CacheError("refusing to write an empty shard")
        ids = [sid for sid, _ in samples]
        key = shard_key(ids)
        if self.is_finished(key):
            return key
        dtype = _DTYPES[self.spec.storage_dtype]
        acts = torch.cat([s.acts for _, s in samples]).to(dtype).contiguous()
        is_image = torch.cat([s.is_image for _, s in samples]).to(torch.uint8)
        tensors = {"acts": acts, "is_image": is_image}
        if all(s.content is not None for _, s in samples):
            tensors["content"] = torch.cat([s.content for _, s in samples]).to(torch.uint8)
        lengths = torch.tensor([s.n_positions for _, s in samples])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        if not storage.exists(self._uri("spec", ".json"), self.so):
            storage.write_json(self._uri("spec", ".json"), {**asdict(self.spec), "format": FORMAT_VERSION}, self.so)
        storage.write_bytes(self._uri(key, ".safetensors"),
                            save({**tensors, "offsets": offsets}), self.so)
        index = pa.table({"sample_id": ids, "start": offsets[:-1].tolist(), "length": lengths.tolist(),
                          "n_image": [s.n_image for _, s in samples],
                          "truncated_tokens": [s.truncated_tokens for _, s in samples]})
        buf = io.BytesIO()
        pq.write_table(index, buf)
        storage.write_bytes(self._uri(key, ".index.parquet"), buf.getvalue(), self.so)
        storage.write_json(self._uri(key, ".done.json"),
                           {"samples": len(ids), "tokens": int(offsets[-1]), "d": int(acts.shape[1])}, self.so)
        return key

    def read_shard(self, key: str) -> CachedShard:
        if not self.is_finished(key):
            raise CacheError(f"shard {key} in {self.uri} is not finished (no done marker): not reading it")
        tensors = load(storage.read_bytes(self._uri(key, ".safetensors"), self.so))
        index = pq.read_table(io.BytesIO(storage.read_bytes(self._uri(key, ".index.parquet"), self.so)))
        content = tensors["content"].bool() if "content" in tensors else None
        return CachedShard(index.column("sample_id").to_pylist(), tensors["acts"].float(),
                           tensors["is_image"].bool(), tensors["offsets"], content)

    def read_truncation(self, key: str) -> dict[str, int]:
        """sample_id -> text tokens cut to fit the context (only the samples that were cut)."""
        index = pq.read_table(io.BytesIO(storage.read_bytes(self._uri(key, ".index.parquet"), self.so)))
        if "truncated_tokens" not in index.column_names:
            return {}
        return {sid: n for sid, n in zip(index.column("sample_id").to_pylist(),
                                         index.column("truncated_tokens").to_pylist()) if n}

    def token_chunks(self, keys: Sequence[str]) -> Iterator[torch.Tensor]:
        """Every cached residual vector of the given shards, shard by shard (for SAE training)."""
        for key in keys:
            yield self.read_shard(key).acts
