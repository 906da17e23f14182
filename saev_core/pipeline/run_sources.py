"""A curation run rebuilt from its manifest: where its activation cache, record shards, SAE,
cross-modal weights, model config and processor live, and readers for them (what `explain`, the
run's report and the benchmarks start from)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.model.activation_cache import ActivationCache, CacheSpec, shard_key
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.sources import resolve_model_id
from saev_core.sae.weights import CrossModalWeights

if TYPE_CHECKING:
    from saev_core.pipeline.manifest import RunManifest

log = logging.getLogger(__name__)


class RunSourceError(ValueError):
    """A run whose inputs cannot be found or do not match its manifest, with the reason."""


@dataclass
class RunSources:
    """Where a run's inputs live, found from its manifest (see flows/curate.py)."""

    run: str
    manifest: dict
    work_uri: str
    options: dict | None
    cache: ActivationCache
    record_uris: list[str]
    shard_keys: list[str | None]  # activation shard of each record shard's cached rows (None: none cached)
    sae_uri: str
    weights_uri: str | None
    delta: float
    method: str
    top_k: int
    model_id: str
    revision: str | None
    trust_remote_code: bool
    model_spec: dict | None = None  # the run's ModelSpec: captures samples whose residuals are not cached
    extra_keys: list[str] = field(default_factory=list)  # activation shards of the report's own samples
    _scores: pa.Table | None = field(default=None, init=False, repr=False)
    _adapter: MLLMAdapter | None = field(default=None, init=False, repr=False)
    _extra: dict | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_manifest(cls, manifest: dict | RunManifest, run: str, work_uri: str | None = None,
                      record_uris: list[str] | None = None, options: dict | None = None) -> "RunSources":
        from pydantic import ValidationError

        from saev_core.pipeline.manifest import RunManifest

        try:
            m = manifest if isinstance(manifest, RunManifest) else RunManifest.model_validate(manifest)
        except ValidationError as exc:
            raise RunSourceError(f"manifest of {run} is not a curate run's manifest: {exc}") from None
        work = work_uri or _default_work(run, m, options)
        if record_uris is None:
            record_uris = _record_shards(work, m, options)
        from saev_core.data.ingest import read_record_shard

        if m.cache_shards is not None:
            if len(m.cache_shards) != len(record_uris):
                raise RunSourceError(f"the manifest pairs {len(m.cache_shards)} activation shards with the run's "
                                     f"record shards, but {len(record_uris)} record shards were given: pass the "
                                     "run's own record shards (or none, to read them from the manifest)")
            keys = list(m.cache_shards)
        else:  # a run from before the residual sample cached every row: shards named by the records' ids
            keys = []
            for uri in record_uris:
                ids = read_record_shard(uri, options, columns=["sample_id"]).column("sample_id").to_pylist()
                keys.append(shard_key(ids) if ids else None)
        cache = _run_cache(work, m, [k for k in keys if k], options)
        sc = m.scoring
        model = m.model.model_dump(exclude={"fingerprint"})
        extra = [k for k in (m.report_shards or []) if cache.is_finished(k)]
        return cls(run, m.to_json(), work, options, cache, list(record_uris), keys, m.sae.uri, sc.weights_uri,
                   float(sc.delta), sc.method, sc.score.top_k, resolve_model_id(m.model.model_id), m.model.revision,
                   m.model.trust_remote_code, model, extra)

    @classmethod
    def from_run(cls, run: str, work_uri: str | None = None, options: dict | None = None) -> "RunSources":
        from saev_core.data.publish import read_manifest

        return cls.from_manifest(read_manifest(run, options), run, work_uri, None, options)

    # ------------------------------------------------------------- loaders
    def load_sae(self):
        from saev_core.sae.training import load_sae

        return load_sae(self.sae_uri, storage_options=self.options)

    def load_weights(self, sae=None) -> CrossModalWeights:
        """The run's weights file (manifest `scoring.weights_uri`); when it is missing, recomputed
        from the cache with the run's scoring parameters: its pool, its resolved delta (which the
        per-modality pool filters by) and the shards its weights came from (same inputs, same result)."""
        from safetensors.torch import load

        uri = self.weights_uri
        if uri is not None and storage.exists(uri, self.options):
            return CrossModalWeights.from_tensors(load(storage.read_bytes(uri, self.options)))
        log.warning("weights file of %s not found: recomputing cross-modal weights from the cache", self.run)
        from saev_core.pipeline.stages import build_weights

        from saev_core.pipeline.manifest import ScoringRecord

        sc = ScoringRecord.model_validate(self.manifest["scoring"])
        keys = sc.weight_shards or [k for k in self.shard_keys if k]
        w, _ = build_weights(self.cache, keys, sae or self.load_sae(), sc.weights.fixed(sc.delta))
        return w

    def config_and_processor(self):
        from transformers import AutoConfig

        from saev_core.model.families import load_processor

        cfg = AutoConfig.from_pretrained(self.model_id, revision=self.revision, trust_remote_code=self.trust_remote_code)
        proc = load_processor(self.model_id, cfg.model_type, revision=self.revision,
                              trust_remote_code=self.trust_remote_code)
        return cfg, proc

    def scores(self) -> pa.Table:
        """The run's published scores, read once."""
        if self._scores is None:
            from saev_core.data.publish import read_scores

            self._scores = read_scores(self.run, self.options)
        return self._scores

    # ------------------------------------------------------------- samples
    def resolve_sample_id(self, sample_id: str) -> str:
        """A full id, or a unique prefix of one (reports show the first 12 characters)."""
        ids = self.scores().column("sample_id").to_pylist()
        if sample_id in ids:
            return sample_id
        hits = [s for s in ids if s.startswith(sample_id)]
        if len(hits) == 1:
            return hits[0]
        raise RunSourceError(f"sample {sample_id!r}: {'no' if not hits else len(hits)} samples of run {self.run} "
                             "match" + ("" if not hits else "; give more characters"))

    def records(self, sample_ids: Sequence[str]) -> dict[str, dict]:
        """sample_id -> {prompt, image (bytes), chosen, rejected, shard_key, index}: the activation
        shard holding its residuals and its row there (both None when they were not cached)."""
        from saev_core.data.ingest import read_record_shard

        want = set(sample_ids)
        found: dict[str, dict] = {}
        for uri, key in zip(self.record_uris, self.shard_keys):
            t = read_record_shard(uri, self.options, columns=["sample_id", "prompt", "image", "chosen", "rejected"])
            t = t.filter(pc.is_in(t.column("sample_id"), pa.array(sorted(want), pa.string())))
            if not t.num_rows:
                continue
            pos = {s: (key, i) for i, s in enumerate(self._cached_ids(key))}
            for r in t.to_pylist():
                where = pos.get(r["sample_id"]) or self._extra_pos().get(r["sample_id"], (None, None))
                found[r["sample_id"]] = {**r, "shard_key": where[0], "index": where[1]}
            if len(found) == len(want):
                break
        return found

    def _extra_pos(self) -> dict[str, tuple[str, int]]:
        if self._extra is None:
            self._extra = {sid: (k, i) for k in self.extra_keys for i, sid in enumerate(self._cached_ids(k))}
        return self._extra

    def _cached_ids(self, key: str | None) -> list[str]:
        return [] if key is None else self.cache.index(key).column("sample_id").to_pylist()

    def activations(self, sid: str, rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(acts float32, is_image) of one sample: its cached residuals (the residual sample, or
        the shard the flow captured for the report), else a capture with the run's model (loaded
        once, on first need: e.g. `explain sample` on a sample outside both)."""
        if rec.get("shard_key") is not None:
            got, acts, is_image = next(self.cache.iter_samples(rec["shard_key"], [rec["index"]]))
            if got != sid:
                raise RunSourceError(f"cache shard {rec['shard_key']} holds {got} at row {rec['index']}, not {sid}")
            return acts, is_image
        if self.model_spec is None:
            raise RunSourceError(f"sample {sid}: its residuals were not cached and the manifest names no model")
        from saev_core.model.budget import capture_bounded
        from saev_core.pipeline.loaded_models import adapter_for
        from saev_core.pipeline.specs import ModelSpec

        spec = ModelSpec(**self.model_spec)
        if self._adapter is None:
            self._adapter = adapter_for(spec)
        cap = capture_bounded(self._adapter, [normalize_image(rec["image"])], [rec["prompt"]], batch_size=1,
                              batch_tokens=spec.batch_tokens)[0]
        return cap.acts.float(), cap.is_image

    def iter_samples(self, max_samples: int | None = None) -> Iterator[tuple[str, dict, torch.Tensor, torch.Tensor]]:
        """(sample_id, record, acts, is_image) of the cached samples in record order, one sample's
        residuals in memory at a time."""
        from saev_core.data.ingest import read_record_shard

        left = max_samples
        for uri, key in zip(self.record_uris, self.shard_keys):
            if key is None:
                continue
            if left is not None and left <= 0:
                return
            rec = read_record_shard(uri, self.options, columns=["sample_id", "prompt", "image"])
            rec = {r["sample_id"]: r for r in rec.to_pylist()}
            for sid, acts, img in self.cache.iter_samples(key):
                if left is not None and left <= 0:
                    return
                if sid not in rec:
                    raise RunSourceError(f"cache shard {key} holds sample {sid}, which records {uri} do not")
                yield sid, rec[sid], acts, img
                if left is not None:
                    left -= 1


def _default_work(run: str, m: "RunManifest", options) -> str:
    """<run>/../../_work when it exists (the run folder may have moved with it), else the manifest's."""
    beside = storage.join(storage.parent(storage.parent(run)), "_work")
    if storage.exists(storage.join(beside, "activations"), options):
        return beside
    return m.work_uri or storage.join(m.parameters.get("output", {}).get("uri", "runs"), "_work")


def _rebased(uri: str, old_work: str | None, work: str) -> str:
    """A work-folder URI of the manifest, moved under `work` when the run's work folder moved."""
    if old_work and uri.startswith(old_work.rstrip("/") + "/"):
        return storage.join(work, uri[len(old_work.rstrip("/")) + 1:])
    return uri


def _record_shards(work: str, m: "RunManifest", options) -> list[str]:
    """The record shards the manifest names (relative to its work folder)."""
    if not m.record_uris:
        raise RunSourceError("the manifest names no record shards: pass record_uris or --work")
    uris = [_rebased(u, m.work_uri, work) for u in m.record_uris]
    missing = [u for u in uris if not storage.exists(u, options)]
    if missing:
        raise RunSourceError(f"record shard {missing[0]} of the run is missing under {work}: pass --work")
    return uris


def _run_cache(work: str, m: "RunManifest", keys: list[str], options) -> ActivationCache:
    """The run's activation cache, named by the manifest's cache spec."""
    if not m.cache:
        raise RunSourceError("the manifest names no activation cache")
    names = {f.name for f in dataclasses.fields(CacheSpec)}
    cache = ActivationCache(storage.join(work, "activations"),
                            CacheSpec(**{k: v for k, v in m.cache.items() if k in names}), options)
    missing = [k for k in keys if not cache.is_finished(k)]
    if missing:
        raise RunSourceError(f"activation cache {cache.uri} lacks {len(missing)} of the run's {len(keys)} shards")
    return cache
