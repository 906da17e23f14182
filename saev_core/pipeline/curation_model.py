"""The curation model: everything that turns a row into a score, as one versioned artifact.

A finished run's SAE checkpoint, cross-modal weights, delta, scoring spec, model identity (id,
revision, layer, fingerprint), cache spec and an absolute keep threshold are copied to
`<output>/_models/<name>/v<N>/` with a sha256 per file. `curation_model.json` is written last
and never overwritten, so a version that has it is complete and immutable; a later promotion
takes the next N. A run that pins a version (`scoring.curation_model`) uses it as it is: no SAE
training, no weights, no delta; so a row's score depends on the row's content only, and every
file is checked against its checksum before use (a tampered or missing file is an error).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from saev_core.data import publish, storage
from saev_core.pipeline.hashing import digest, git_version
from saev_core.pipeline.manifest import ScoringRecord, nested_scoring
from saev_core.pipeline.preflight import ConfigError
from saev_core.pipeline.results import Weights
from saev_core.pipeline.specs import ScoreSpec, ScoringSpec
from saev_core.sae.training import CFG_FILE, WEIGHTS_FILE

MODELS_DIR = "_models"
CARD_FILE = "curation_model.json"
FORMAT = "saev-curation-model/v1"
SAE_DIR = "sae"
WEIGHTS = "weights.safetensors"
REFERENCE_CANARIES = "reference_canaries.parquet"  # the promoted run's canaries.parquet, scored by this model
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*?)(?:@v(?P<version>\d+))?$")


class CurationModelError(ConfigError):
    """A curation model that cannot be used as it is (missing, incomplete, tampered, or not
    matching the run's model): permanent, nothing is scored or published."""

    def __init__(self, where: str, found: str, fix: str, evidence: dict | None = None):
        super().__init__(where, found, fix, evidence)
        self.stage = "curation-model"


class CurationModel(BaseModel):
    """What `curation_model.json` holds; `uri` (its folder) is filled in when it is read."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str
    version: int
    created_at: str
    code_version: str
    source_run: str
    dataset: str
    model: dict[str, Any]  # ModelSpec fields that change a score, plus `fingerprint`
    cache: dict[str, Any]  # the CacheSpec the statistics were computed under
    scoring: dict[str, Any]  # method, columns, top_k, seed, null_samples, delta, n_cross_modal, d_sae, pool
    sae_sha256: str
    keep_threshold: dict[str, Any]  # {"percent": p, "score": the source run's score at its top p%}
    files: dict[str, str]  # path inside the version folder -> sha256
    uri: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def key(self) -> str:
        """Identifies what scores a row: the files' checksums and the scoring spec. Stored scores
        are reused only under the same key."""
        return digest([self.files, self.scoring, self.model.get("fingerprint"), self.cache], 20)

    @property
    def sae_uri(self) -> str:
        return storage.join(self.uri, SAE_DIR)

    @property
    def weights_uri(self) -> str:
        return storage.join(self.uri, WEIGHTS)

    @property
    def reference_canaries_uri(self) -> str | None:
        return storage.join(self.uri, REFERENCE_CANARIES) if REFERENCE_CANARIES in self.files else None

    @property
    def threshold(self) -> float:
        return float(self.keep_threshold["score"])

    def scoring_spec(self, asked: ScoringSpec) -> ScoringSpec:
        """A run's scoring spec with what this model fixes: the methods, the score part and the
        weights as they were made (pool, samples, resolved delta), so the run's manifest describes
        the weights that scored it, and promoting that run again gives the same card."""
        s = self.scoring
        made = {k: s[k] for k in ("weight_samples", "pool_size", "k") if s.get(k) is not None}
        return asked.model_copy(update={
            "method": s["method"], "baselines": [c for c in s["columns"] if c != s["method"]],
            "score": ScoreSpec(top_k=s["top_k"], seed=s.get("seed", 0), null_samples=s["null_samples"]),
            "weights": asked.weights.model_copy(update={"pool": s.get("pool") or "joint", **made}).fixed(s["delta"])})

    def weights_info(self) -> Weights:
        """The score flow's weights result, fixed by this model (nothing is computed)."""
        s = self.scoring
        return Weights(uri=self.weights_uri, n_cross_modal=int(s["n_cross_modal"]), d_sae=int(s["d_sae"]),
                       delta=float(s["delta"]))

    def record(self) -> dict:
        """What a run's manifest says about the version that scored it (`identity`: the key of its
        stored scores; not named `key`, which manifests redact as a secret)."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "uri": self.uri, "identity": self.key,
                "keep_threshold": self.keep_threshold, "sae_sha256": self.sae_sha256,
                "source_run": self.source_run}


def models_uri(output_uri: str, name: str | None = None) -> str:
    root = storage.join(output_uri, MODELS_DIR)
    return storage.join(root, name) if name else root


def _sha256(uri: str, storage_options: dict | None) -> str:
    h = hashlib.sha256()
    with storage.open_input(uri, storage_options) as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def versions(output_uri: str, name: str, storage_options: dict | None = None,
             complete_only: bool = True) -> list[int]:
    """Version numbers under `<output>/_models/<name>/`, ascending: those with their card by
    default, else every `v<N>` folder holding any file (a promotion that did not finish)."""
    root = models_uri(output_uri, name)
    found = set()
    for uri in storage.list_files(root, storage_options):  # listings refreshed: see other promotions
        rel = uri[len(root.rstrip("/")):].lstrip("/").replace("\\", "/")
        folder = rel.split("/", 1)[0]
        m = re.fullmatch(r"v(\d+)", folder)
        if m and (not complete_only or rel == f"{folder}/{CARD_FILE}"):
            found.add(int(m.group(1)))
    return sorted(found)


def _threshold(manifest: dict, keep_percent: int | None) -> dict:
    """The absolute keep threshold: the source run's lowest kept score in its top-p% subset."""
    subsets = manifest.get("subsets") or {}
    percents = sorted(int(n.removeprefix("top-")) for n in subsets if re.fullmatch(r"top-\d+", n))
    if keep_percent is None:
        keep_percent = 50 if 50 in percents else (percents[0] if percents else None)
    name = f"top-{keep_percent}"
    if keep_percent is None or name not in subsets or subsets[name].get("min_score") is None:
        raise ConfigError(f"--keep-percent {keep_percent}", f"the run has no {name} subset (it has "
                          f"{', '.join(sorted(subsets)) or 'none'})", "Promote with a keep percent the run published")
    return {"percent": keep_percent, "score": float(subsets[name]["min_score"])}


def promote_run(run: str, name: str, output_uri: str | None = None, keep_percent: int | None = None,
                storage_options: dict | None = None) -> CurationModel:
    """Copy what scored the finished run `run` into `<output>/_models/<name>/v<N>/` (N one more
    than the newest version there, complete or not: a version is never overwritten), checksums
    computed on the copies, the card written last and exclusively. `output_uri` defaults to the
    run's output root (`<output>/<dataset>/<run_id>`)."""
    if not _NAME_RE.match(name):
        raise ConfigError("--name", f"{name!r} is not a valid curation model name",
                          "Use letters, digits and ._- (not starting with a dot)")
    manifest = publish.read_manifest(run, storage_options)  # RunIncomplete for an unfinished run
    if (manifest.get("scoring") or {}).get("weights_uri") is None:
        raise ConfigError(run, "its manifest names no cross-modal weights", "Promote a run that computed them")
    dataset_uri = storage.parent(run)
    output_uri = output_uri or storage.parent(dataset_uri)
    sae, scoring = manifest["sae"], manifest["scoring"]
    found = _sha256(storage.join(sae["uri"], WEIGHTS_FILE), storage_options)
    if found != sae["sha256"]:
        raise CurationModelError(sae["uri"], f"the SAE's weights have sha256 {found[:12]}..., the run recorded "
                                 f"{sae['sha256'][:12]}...", "The run's work folder changed since it ran: promote a "
                                 "run whose files are intact")
    threshold = _threshold(manifest, keep_percent)
    taken = versions(output_uri, name, storage_options, complete_only=False)
    version = (taken[-1] if taken else 0) + 1
    folder = storage.join(models_uri(output_uri, name), f"v{version}")
    copies = {f"{SAE_DIR}/{CFG_FILE}": storage.join(sae["uri"], CFG_FILE),
              f"{SAE_DIR}/{WEIGHTS_FILE}": storage.join(sae["uri"], WEIGHTS_FILE),
              WEIGHTS: scoring["weights_uri"]}
    if (manifest.get("canaries") or {}).get("file"):  # the fixed reference set of every pinned run's canaries
        copies[REFERENCE_CANARIES] = storage.join(run, manifest["canaries"]["file"])
    files = {}
    for rel, src in copies.items():
        data = storage.read_bytes(src, storage_options)
        storage.write_bytes(storage.join(folder, rel), data, storage_options, overwrite=False)
        files[rel] = hashlib.sha256(data).hexdigest()
    model = dict(manifest["model"])
    rec = ScoringRecord.model_validate(nested_scoring(manifest))  # a manifest from before issue 23 too
    card = CurationModel(
        name=name, version=version, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        code_version=git_version(), source_run=run, dataset=storage.basename(dataset_uri),
        model={k: model.get(k) for k in ("model_id", "revision", "layer", "dtype", "max_tokens", "trust_remote_code",
                                         "cache_dtype", "sae_dtype", "fingerprint")},
        cache=manifest["cache"],
        scoring=card_scoring(rec),
        sae_sha256=files[f"{SAE_DIR}/{WEIGHTS_FILE}"], keep_threshold=threshold, files=files)
    storage.write_bytes(storage.join(folder, CARD_FILE), card.model_dump_json(indent=2, exclude={"uri"}).encode(),
                        storage_options, overwrite=False)  # last: a version with its card is complete
    return card.model_copy(update={"uri": folder})


def card_scoring(rec: ScoringRecord) -> dict[str, Any]:
    """The card's `scoring`: a flat mapping, as versions promoted before issue 23 hold it (so they
    load, and keep their key and their stored scores)."""
    w, sc = rec.weights, rec.score
    return {"method": rec.method, "columns": rec.columns, "top_k": sc.top_k, "null_samples": sc.null_samples,
            "delta": rec.delta, "n_cross_modal": rec.n_cross_modal, "d_sae": rec.d_sae, "pool": w.pool,
            "pool_size": w.pool_size, "k": w.k, "weight_samples": w.weight_samples, "seed": sc.seed}


def parse_ref(ref: str) -> tuple[str, int | None] | None:
    """`NAME` or `NAME@vN` -> (name, N or None); None when `ref` is a URI or a path."""
    if "://" in ref or "/" in ref or "\\" in ref:
        return None
    m = _REF_RE.match(ref)
    if not m:
        raise ConfigError("scoring.curation_model", f"{ref!r} is neither NAME, NAME@vN nor a folder URI",
                          "Give a promoted model's name (e.g. nightly or nightly@v3) or its folder")
    return m.group("name"), int(m.group("version")) if m.group("version") else None


def resolve(ref: str, output_uri: str, storage_options: dict | None = None) -> str:
    """The folder of a curation model named by `ref`: a folder URI as it is, NAME (its newest
    complete version) or NAME@vN under `<output>/_models/`."""
    parsed = parse_ref(ref)
    if parsed is None:
        return ref.rstrip("/")
    name, version = parsed
    if version is None:
        have = versions(output_uri, name, storage_options)
        if not have:
            raise CurationModelError("scoring.curation_model", f"no promoted version of {name!r} under "
                                     f"{models_uri(output_uri)}", "Promote one first: saev-curate promote RUN "
                                     f"--name {name}")
        version = have[-1]
    return storage.join(models_uri(output_uri, name), f"v{version}")


def load(ref: str, output_uri: str, storage_options: dict | None = None, verify: bool = True) -> CurationModel:
    """Read a curation model and check every file against its checksum (`verify`). A missing
    card, a missing file or a changed byte raises CurationModelError naming the file."""
    folder = resolve(ref, output_uri, storage_options)
    card_uri = storage.join(folder, CARD_FILE)
    if not storage.exists(card_uri, storage_options):
        raise CurationModelError(card_uri, "is missing (no such version, or its promotion did not finish)",
                                 "Name a complete version (saev-curate runs lists the ones in use) or promote again")
    try:
        card = CurationModel.model_validate_json(storage.read_bytes(card_uri, storage_options))
    except ValueError as exc:
        raise CurationModelError(card_uri, f"is not a valid curation model card ({str(exc).splitlines()[0]})",
                                 "Restore the file from the promotion or promote again") from None
    card = card.model_copy(update={"uri": folder})
    if verify:
        for rel, want in card.files.items():
            uri = storage.join(folder, rel)
            if not storage.exists(uri, storage_options):
                raise CurationModelError(uri, f"is missing from curation model {card.ref}",
                                         "Restore it or promote a new version; nothing was scored")
            got = _sha256(uri, storage_options)
            if got != want:
                raise CurationModelError(uri, f"has sha256 {got[:12]}..., curation model {card.ref} recorded "
                                         f"{want[:12]}... (the file was changed after promotion)",
                                         "Restore it or promote a new version; nothing was scored")
    return card


def check_model(card: CurationModel, fingerprint: str) -> None:
    """The run's model weights must be those the curation model was promoted with."""
    want = card.model.get("fingerprint")
    if want and fingerprint != want:
        raise CurationModelError(f"model {card.model.get('model_id')}", f"its fingerprint is {fingerprint}, "
                                 f"curation model {card.ref} was made with {want}",
                                 "Point model.model_id at the same weights, or train and promote a new version")
