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

import contextlib
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

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
        """The cache spec of a `ModelSpec`: its compute and storage dtypes are decided where the
        run is planned (the spec's dtypes, else the defaults of the device it names)."""
        device = resolve_device(model.device)
        compute = model.dtype or str(default_dtype(device)).removeprefix("torch.")
        stored = model.cache_dtype
        if stored == "auto":
            stored = "bfloat16" if device.type == "cuda" else "float32"
        return cls(model_id=model.model_id, layer=model.layer, revision=model.revision,
                   storage_dtype=stored, compute_dtype=compute, response=response,
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
        content = [s.content for _, s in samples]
        content = content if all(c is not None for c in content) else None
        lengths = torch.tensor([s.n_positions for _, s in samples])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
        if not storage.exists(self._uri("spec", ".json"), self.so):
            storage.write_json(self._uri("spec", ".json"), {**asdict(self.spec), "format": FORMAT_VERSION}, self.so)
        _write_safetensors(self._uri(key, ".safetensors"), self.so, dtype, [s.acts for _, s in samples],
                           [s.is_image for _, s in samples], offsets, content)
        index = pa.table({"sample_id": ids, "start": offsets[:-1].tolist(), "length": lengths.tolist(),
                          "n_image": [s.n_image for _, s in samples],
                          "truncated_tokens": [s.truncated_tokens for _, s in samples]})
        buf = io.BytesIO()
        pq.write_table(index, buf)
        storage.write_bytes(self._uri(key, ".index.parquet"), buf.getvalue(), self.so)
        storage.write_json(self._uri(key, ".done.json"),
                           {"samples": len(ids), "tokens": int(offsets[-1]), "d": int(samples[0][1].acts.shape[1])},
                           self.so)
        return key

    def index(self, key: str) -> pa.Table:
        """The shard's small per-sample index: sample_id, start, length, n_image."""
        if not self.is_finished(key):
            raise CacheError(f"shard {key} in {self.uri} is not finished (no done marker): not reading it")
        return pq.read_table(io.BytesIO(storage.read_bytes(self._uri(key, ".index.parquet"), self.so)))

    @contextlib.contextmanager
    def open_shard(self, key: str, checked: bool = False) -> Iterator["ShardFile"]:
        """Ranged reads of a finished shard's tensors (local file or object storage); `checked`
        skips the done-marker lookup for a key already checked (one request less per sample)."""
        if not checked and not self.is_finished(key):
            raise CacheError(f"shard {key} in {self.uri} is not finished (no done marker): not reading it")
        uri = self._uri(key, ".safetensors")
        with storage.open_input(uri, self.so) as fh:
            yield ShardFile(fh, uri)

    def read_shard(self, key: str) -> CachedShard:
        """The whole shard in memory (one read; one more copy only to widen half precision)."""
        index = self.index(key)
        with self.open_shard(key) as f:
            acts, is_image, offsets = f.rows("acts"), f.rows("is_image"), f.rows("offsets")
            content = f.rows("content").bool() if "content" in f.meta else None
        return CachedShard(index.column("sample_id").to_pylist(), acts.float(), is_image.bool(), offsets, content)

    def iter_samples(self, key: str, which: Sequence[int] | None = None,
                     ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(sample_id, acts float32, is_image) of the shard's samples `which` (default all), one
        ranged read each: memory is one sample, not the shard."""
        index = self.index(key)
        ids, starts, lengths = (index.column(c).to_pylist() for c in ("sample_id", "start", "length"))
        with self.open_shard(key) as f:
            for i in range(len(ids)) if which is None else which:
                lo, hi = starts[i], starts[i] + lengths[i]
                yield ids[i], f.rows("acts", lo, hi).float(), f.rows("is_image", lo, hi).bool()

    def read_truncation(self, key: str) -> dict[str, int]:
        """sample_id -> text tokens cut to fit the context (only the samples that were cut)."""
        index = pq.read_table(io.BytesIO(storage.read_bytes(self._uri(key, ".index.parquet"), self.so)))
        if "truncated_tokens" not in index.column_names:
            return {}
        return {sid: n for sid, n in zip(index.column("sample_id").to_pylist(),
                                         index.column("truncated_tokens").to_pylist()) if n}

    def token_chunks(self, keys: Sequence[str]) -> Iterator[torch.Tensor]:
        """Every cached residual vector of the given shards, one sample at a time, in order."""
        for key in keys:
            for _, acts, _ in self.iter_samples(key):
                yield acts


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
              "I64": torch.int64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardFile:
    """Row ranges of one safetensors file read through an open file object, so a sample costs
    one ranged read of its own rows (safetensors' own lazy reader only opens local paths)."""

    def __init__(self, fh, uri: str):
        self._fh, self.uri = fh, uri
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"{uri}: not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self._base, self.meta = 8 + n, header

    def rows(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        if name not in self.meta:
            raise CacheError(f"{self.uri}: tensor {name!r} missing (has {sorted(self.meta)})")
        m = self.meta[name]
        dtype, shape = _ST_DTYPES[m["dtype"]], m["shape"]
        hi = shape[0] if hi is None else hi
        if not 0 <= lo <= hi <= shape[0]:
            raise CacheError(f"{self.uri}: rows {lo}:{hi} of {name!r} out of range (has {shape[0]})")
        row = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((hi - lo, *shape[1:]), dtype=dtype)  # read straight into it: one copy
        raw = memoryview(out.view(-1).view(torch.uint8).numpy())
        self._fh.seek(self._base + m["data_offsets"][0] + lo * row)
        got = self._fh.readinto(raw)
        if got != len(raw):
            raise CacheError(f"{self.uri}: truncated ({got} of {len(raw)} bytes for rows {lo}:{hi} of {name!r})")
        return out


def _write_safetensors(uri: str, so: dict | None, dtype: torch.dtype, acts: list[torch.Tensor],
                       is_image: list[torch.Tensor], offsets: torch.Tensor,
                       content: list[torch.Tensor] | None = None) -> None:
    """Stream a shard's safetensors file sample by sample: no concatenated copy of the shard."""
    n, d = int(offsets[-1]), int(acts[0].shape[1])
    parts = [("acts", dtype, [n, d]), ("is_image", torch.uint8, [n]), ("offsets", torch.int64, [len(offsets)])]
    if content is not None:
        parts.append(("content", torch.uint8, [n]))
    header, pos = {}, 0
    for name, dt, shape in parts:
        size = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so the data is 8-byte aligned
    with storage.atomic_output(uri, so) as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for a in acts:
            if a.shape[1] != d:
                raise CacheError(f"{uri}: samples of different widths ({a.shape[1]} vs {d})")
            fh.write(a.to(dtype).contiguous().view(torch.uint8).numpy())
        for m in is_image:
            fh.write(m.to(torch.uint8).contiguous().numpy())
        fh.write(offsets.to(torch.int64).contiguous().numpy())
        for c in content or []:
            fh.write(c.to(torch.uint8).contiguous().numpy())
