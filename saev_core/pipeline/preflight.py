"""Checks that a run can succeed, made before any work: fail fast, fail short.

Everything a run needs that can be checked cheaply is checked here, before ingest: the
configuration's keys, the dataset's files and columns, the model folder and the hooked layer,
the output bucket or folder, and that the run id is not already published. A problem raises
:class:`ConfigError`, a *permanent* error: retrying cannot fix it, so the orchestration layer
must not retry it (see :func:`is_permanent`), and a command line prints its message, one
paragraph naming the file, column or key, what was found, and what to do, without a traceback.

No Prefect here: the same checks run from a notebook, the CLI (before Prefect even starts) and
as the flow's first stage (for runs started from the UI).
"""

from __future__ import annotations

import difflib
import os
import typing
from typing import Any

from saev_core.data import storage
from saev_core.refusal import Refusal

__all__ = ["ConfigError", "is_permanent", "config_error_from_validation", "check_dataset", "check_model",
           "check_output", "check_run", "check_sae", "preflight"]


class ConfigError(Refusal):
    """A permanent problem with the run's inputs found before any work: ``where`` (file, column
    or key), what was found, and what to do (a :class:`~saev_core.refusal.Refusal` of stage
    ``preflight``)."""

    def __init__(self, where: str, found: str, fix: str, evidence: dict | None = None):
        super().__init__("preflight", where, found, fix, evidence)


def is_permanent(exc: BaseException | None) -> bool:
    """True for errors a retry cannot fix (a :class:`Refusal`: bad configuration, an unreadable
    file, a dataset with no usable row, the ranking gate; a schema, a missing path or layer, an
    already published run, a failed validation gate); False for everything else, which may
    be a transient fault of a store or a worker."""
    if exc is None:
        return False
    from pydantic import ValidationError

    from saev_core.data.formats import FormatError
    from saev_core.data.gx_results import ValidationFailed
    from saev_core.data.publish import RunAlreadyPublished
    from saev_core.model.mllm import MLLMError

    permanent = (Refusal, ValidationError, FormatError, RunAlreadyPublished, ValidationFailed, MLLMError,
                 FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    return isinstance(exc, permanent)


# ------------------------------------------------------------------------------ configuration
def _model_of(annotation: Any):
    """The pydantic model class inside an annotation (``X``, ``X | None``, ``Optional[X]``)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def config_error_from_validation(exc, model_cls, source: str = "config") -> ConfigError:
    """One paragraph for a pydantic ``ValidationError`` of ``model_cls``: each bad key by its
    dotted name, an unknown key with the likely intended one. A refusal a validator raised (a key
    that moved, `ScoringSpec`) is already that paragraph: it is returned as it is."""
    lines = []
    for err in exc.errors():
        if isinstance((err.get("ctx") or {}).get("error"), Refusal):
            return err["ctx"]["error"]
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            cls = model_cls
            for part in loc[:-1]:
                field = getattr(cls, "model_fields", {}).get(part)
                cls = _model_of(field.annotation) if field is not None else None
                if cls is None:
                    break
            known = sorted(getattr(cls, "model_fields", {})) if cls is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            hint = f"did you mean {'.'.join(loc[:-1] + close)}?" if close else (
                f"known keys here: {', '.join(known)}" if known else "")
            lines.append(f"unknown key {key} ({hint})" if hint else f"unknown key {key}")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{key}: {err['msg']} (got {shown[:80]})")
    return ConfigError(source, "; ".join(lines),
                       "Fix these keys (`saev-curate schema` lists every parameter with its default)")


# ------------------------------------------------------------------------------ dataset
def check_dataset(uri: str, fmt: str = "auto", mapping: dict | None = None,
                  storage_options: storage.StorageOptions = None) -> dict:
    """The source exists and every data file has the columns its format needs (read from file
    footers and the first lines, no rows decoded). Returns the format and the files."""
    from saev_core.data.formats import FormatError
    from saev_core.data.ingest import IngestStream
    from saev_core.data.source_files import parquet_file

    if uri.startswith("toy://"):
        return {"format": fmt, "files": []}
    try:
        stream = IngestStream(uri, fmt, mapping=mapping, storage_options=storage_options)
    except FormatError as exc:  # a Refusal too, but of the configured source: named by its key
        raise ConfigError("dataset.uri", f"{exc.where}: {exc.found}", exc.fix, exc.evidence) from None
    except Refusal:
        raise  # an unreadable file: it names the file itself, not a config key
    except FileNotFoundError as exc:
        raise ConfigError("dataset.uri", f"{uri} does not exist ({exc})",
                          "Point dataset.uri at a Parquet or JSON-lines file or a folder of them") from None
    except (TypeError, ValueError) as exc:  # a bad mapping or format name
        raise ConfigError("dataset.mapping" if mapping else "dataset.format", str(exc),
                          "See `saev-curate schema` for the accepted values") from None
    need = stream.mapping.columns()
    for f in stream.files[1:]:
        if f.kind != "parquet":
            continue
        with storage.open_input(f.uri, storage_options) as fh:
            names = set(parquet_file(fh, f.uri).schema_arrow.names)
        missing = [c for c in need if c not in names]
        if missing:
            raise ConfigError(f.uri, f"missing column(s) {missing} that format {stream.format!r} needs "
                              f"(the first file {stream.files[0].uri} has them)",
                              "Make every file of the dataset share one layout, or point at one file")
    return {"format": stream.format, "files": [f.uri for f in stream.files]}


# ------------------------------------------------------------------------------ model
def check_model(model_id: str, layer: int, revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """A local model folder exists and holds a config; the hooked layer is inside the model.
    A Hub id is checked only if its config is already in the local cache (no network here)."""
    from transformers import AutoConfig

    from saev_core.pipeline.sources import resolve_model_id

    path = resolve_model_id(model_id)
    local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if local and not os.path.isdir(path):
        raise ConfigError("model.model_id", f"model folder {path} does not exist",
                          "Give a folder saved with save_pretrained (config.json, weights, processor) or a Hub id")
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError("model.model_id", f"{path} has no config.json",
                          "Give the folder that save_pretrained wrote (it holds config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                         local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a Hub id not cached here: checked when the model loads
        if local:
            raise ConfigError("model.model_id", f"cannot read {path}/config.json ({type(exc).__name__}: {exc})",
                              "Check the folder is a complete Hugging Face model") from None
        return {"n_layers": None, "checked": False}
    text = getattr(cfg, "text_config", None) or cfg
    n = getattr(text, "num_hidden_layers", None)
    if n is not None and not -n <= layer < n:
        raise ConfigError("model.layer", f"layer {layer} is outside {model_id}, which has {n} decoder layers "
                          f"(0..{n - 1})", f"Set model.layer between 0 and {n - 1}")
    return {"n_layers": n, "checked": True}


def check_sae(checkpoint: str | None, storage_options: storage.StorageOptions = None) -> None:
    if checkpoint and not storage.exists(storage.join(checkpoint, "cfg.json"), storage_options):
        raise ConfigError("sae.checkpoint", f"{checkpoint} has no cfg.json",
                          "Give a SAELens checkpoint folder (cfg.json + sae_weights.safetensors), or unset "
                          "sae.checkpoint to train one")


# ------------------------------------------------------------------------------ output
def check_output(uri: str, storage_options: storage.StorageOptions = None, key: str = "output.uri") -> None:
    """The output bucket exists (object storage), or the folder can be created (local)."""
    if storage.is_remote(uri):
        proto, rest = uri.split("://", 1)
        bucket = rest.split("/", 1)[0]
        try:
            fs, _ = storage.get_fs(uri, storage_options)
            fs.invalidate_cache()
            there = fs.exists(bucket)
        except Exception as exc:  # noqa: BLE001 - an unreachable endpoint or refused credentials
            endpoint = storage.redact_storage_options(storage_options).get("endpoint_url", "the default endpoint")
            raise ConfigError(key, f"cannot reach bucket {bucket} at {endpoint} ({type(exc).__name__}: {exc})",
                              "Check storage.endpoint_url, that the server runs, and the AWS_* credentials") from None
        if not there:
            raise ConfigError(key, f"bucket {bucket} does not exist ({proto}://{bucket})",
                              "Create the bucket first or point the URI at an existing one")
        return
    path = os.path.abspath(uri)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(key, f"{probe} is a file, so {path} cannot be a folder", "Choose another output folder")
    if not os.access(probe, os.W_OK):
        raise ConfigError(key, f"{probe} is not writable", "Choose a folder you can write to")


def check_run(run: str | None, storage_options: storage.StorageOptions = None) -> None:
    from saev_core.data.publish import RunAlreadyPublished, ensure_unpublished

    if not run:
        return
    try:
        ensure_unpublished(run, storage_options)
    except RunAlreadyPublished:
        raise ConfigError("output.run_id", f"run {storage.basename(run)} is already published at {run}",
                          "Published runs are never overwritten: choose a new output.run_id, or leave it "
                          "unset for a fresh one") from None


def preflight(*, dataset_uri: str, dataset_format: str = "auto", mapping: dict | None = None,
              model_id: str, layer: int, revision: str | None = None, trust_remote_code: bool = False,
              output_uri: str, work_uri: str | None = None, run: str | None = None,
              sae_checkpoint: str | None = None, storage_options: storage.StorageOptions = None) -> dict:
    """Every check, cheapest and most likely first; raises :class:`ConfigError` on the first
    problem. Returns what was learnt (format, files, layers) for the log."""
    source_options = storage_options if storage.is_remote(dataset_uri) else None
    check_output(output_uri, storage_options)
    if work_uri:
        check_output(work_uri, storage_options, key="output.work_uri")
    check_run(run, storage_options)
    model = check_model(model_id, layer, revision, trust_remote_code)
    check_sae(sae_checkpoint, storage_options)
    dataset = check_dataset(dataset_uri, dataset_format, mapping, source_options)
    return {"dataset": dataset, "model": model}
