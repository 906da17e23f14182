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
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saev_core.data import storage
from saev_core.model.mllm import SampleActivations, default_dtype, dtype_name, resolve_device

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
        compute = dtype_name(model.dtype) if model.dtype else \
            str(default_dtype(resolve_device(model.device))).removeprefix("torch.")
        stored = model.cache_dtype
        if stored == "auto":  # the forward's own half precision (lossless, half the bytes), else float32
            stored = compute if compute in ("bfloat16", "float16") else "float32"
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

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype: captures leave the device in it (half the copy in bfloat16)."""
        return _DTYPES[self.spec.storage_dtype]

    def is_finished(self, key: str) -> bool:
        return storage.exists(self._uri(key, ".done.json"), self.so)

    def write_shard(self, samples: Sequence[tuple[str, SampleActivations]]) -> str:
        """Store one shard; returns its key. Done marker last, so readers never see half a shard."""
        if not samples:
            raise CacheError("refusing to write an empty shard")
        writer = self.writer([sid for sid, _ in samples])
        if writer.finished:
            return writer.key
        with writer:
            for i, (_, acts) in enumerate(samples):
                writer.add(i, acts)
            return writer.finish()

    def writer(self, sample_ids: Sequence[str]) -> "ShardWriter":
        """A writer of the shard of these samples (in this order), fed in any order."""
        return ShardWriter(self, list(sample_ids))

    def _write_parts(self, key: str, ids: list[str], parts: list[dict], spool, d: int) -> None:
        dtype = _DTYPES[self.spec.storage_dtype]
        lengths = torch.tensor([p["n"] for p in parts])  # host: the shard's index, written to storage
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])  # host
        if not storage.exists(self._uri("spec", ".json"), self.so):
            storage.write_json(self._uri("spec", ".json"), {**asdict(self.spec), "format": FORMAT_VERSION}, self.so)
        content = [p["content"] for p in parts]
        _write_safetensors(self._uri(key, ".safetensors"), self.so, dtype, d, [(p["at"], p["n"]) for p in parts],
                           spool, [p["is_image"] for p in parts], offsets,
                           content if all(c is not None for c in content) else None)
        index = pa.table({"sample_id": ids, "start": offsets[:-1].tolist(), "length": lengths.tolist(),
                          "n_image": [p["n_image"] for p in parts],
                          "truncated_tokens": [p["truncated"] for p in parts]})
        buf = io.BytesIO()
        pq.write_table(index, buf)
        storage.write_bytes(self._uri(key, ".index.parquet"), buf.getvalue(), self.so)
        storage.write_json(self._uri(key, ".done.json"), {"samples": len(ids), "tokens": int(offsets[-1]), "d": d},
                           self.so)

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
        with storage.open_input(uri, self.so, ranged=True) as fh:
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


class ShardWriter:
    """Builds one shard from samples captured in any order (e.g. batched by length), holding one
    batch in memory: each sample's residuals go to a local spool file as they come (in the
    storage dtype), its small masks stay in memory, and `finish` streams the shard out in the
    writer's sample order. Memory is one batch, not the shard (at 7B shapes a 128-sample shard
    is 5-6 GB in float32); the spool holds the shard on local disk until it is written."""

    def __init__(self, cache: ActivationCache, sample_ids: list[str]):
        if not sample_ids:
            raise CacheError("refusing to write an empty shard")
        self.cache, self.ids = cache, sample_ids
        self.key = shard_key(sample_ids)
        self.finished = cache.is_finished(self.key)
        self._dtype = _DTYPES[cache.spec.storage_dtype]
        self._parts: list[dict | None] = [None] * len(sample_ids)
        self._spool = None
        self._end, self._d = 0, None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._spool is not None:
            self._spool.close()

    def add(self, i: int, s: SampleActivations) -> None:
        """Sample i of the writer's sample ids."""
        if self._parts[i] is not None:
            raise CacheError(f"sample {self.ids[i]} given twice")
        d = int(s.acts.shape[1])
        if self._d is None:
            self._d = d
        elif d != self._d:
            raise CacheError(f"samples of different widths ({d} vs {self._d}) in shard {self.key}")
        if self._spool is None:
            self._spool = tempfile.TemporaryFile(prefix="saev-shard-")
        data = s.acts.detach().to("cpu", self._dtype).contiguous().view(torch.uint8).numpy()
        self._spool.seek(self._end)
        self._spool.write(data)
        self._parts[i] = {"at": self._end, "n": s.n_positions, "is_image": s.is_image.detach().cpu().bool(),
                          "content": None if s.content is None else s.content.detach().cpu().bool(),
                          "n_image": s.n_image, "truncated": s.truncated_tokens}
        self._end += data.nbytes

    def finish(self) -> str:
        """Write the shard (done marker last); returns its key."""
        missing = [sid for sid, p in zip(self.ids, self._parts) if p is None]
        if missing:
            raise CacheError(f"shard {self.key}: {len(missing)} samples never captured, e.g. {missing[:2]}")
        self.cache._write_parts(self.key, self.ids, self._parts, self._spool, self._d)
        return self.key


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
        # host: a read buffer for the file's bytes
        out = torch.empty((hi - lo, *shape[1:]), dtype=dtype)  # read straight into it: one copy
        raw = memoryview(out.view(-1).view(torch.uint8).numpy())
        self._fh.seek(self._base + m["data_offsets"][0] + lo * row)
        got = self._fh.readinto(raw)
        if got != len(raw):
            raise CacheError(f"{self.uri}: truncated ({got} of {len(raw)} bytes for rows {lo}:{hi} of {name!r})")
        return out


def _write_safetensors(uri: str, so: dict | None, dtype: torch.dtype, d: int, rows: list[tuple[int, int]], spool,
                       is_image: list[torch.Tensor], offsets: torch.Tensor,
                       content: list[torch.Tensor] | None = None, chunk: int = 64 * 2**20) -> None:
    """Stream a shard's safetensors file: each sample's residuals copied from the spool (`rows`:
    byte offset and positions per sample, in shard order) in chunks, never the whole shard."""
    n = int(offsets[-1])
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
    row = d * dtype.itemsize
    with storage.atomic_output(uri, so) as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for at, length in rows:
            left = length * row
            spool.seek(at)
            while left:
                data = spool.read(min(chunk, left))
                if not data:
                    raise CacheError(f"{uri}: the local spool file ended early")
                fh.write(data)
                left -= len(data)
        for m in is_image:
            fh.write(m.to(torch.uint8).contiguous().numpy())
        fh.write(offsets.to(torch.int64).contiguous().numpy())
        for c in content or []:
            fh.write(c.to(torch.uint8).contiguous().numpy())
