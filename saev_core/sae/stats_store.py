"""Per-sample scoring statistics (`scoring.SampleStats`) of one shard in one safetensors file.

What a fused scoring pass stores instead of residuals: every score method reads only these, so
weights and delta can be chosen afterwards. Per-feature vectors are stored sparse (CSR: a sample's
nonzero features and values, exact), scalars as columns, sample ids in the metadata. Generic over
the dataclass's fields, so a field added to SampleStats is stored without a change here.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load, save

from saev_core.data import storage
from saev_core.sae.scoring import SampleStats

FORMAT = "saev-sample-stats/1"


class StatsError(ValueError):
    pass


def stats_bytes(stats: list[SampleStats]) -> bytes:
    if not stats:
        raise StatsError("no sample statistics to store")
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "sample_id": [], "fields": {}}
    for f in dataclasses.fields(SampleStats):
        values = [getattr(s, f.name) for s in stats]
        if f.name == "sample_id":
            meta["sample_id"] = list(values)
        elif all(v is None for v in values):
            meta["fields"][f.name] = {"kind": "none"}
        elif isinstance(values[0], dict) or values[0] is None:  # small per-sample dicts (or None): JSON
            meta["fields"][f.name] = {"kind": "json", "values": values}
        elif isinstance(values[0], torch.Tensor) and values[0].dim() == 1:
            rows = [v.detach().cpu() for v in values]
            nz = [torch.nonzero(r).flatten() for r in rows]
            tensors[f"{f.name}.idx"] = torch.cat(nz).to(torch.int32)
            tensors[f"{f.name}.val"] = torch.cat([r[i] for r, i in zip(rows, nz)]).contiguous()
            # host: statistics written to storage
            tensors[f"{f.name}.ptr"] = torch.tensor([0] + [len(i) for i in nz]).cumsum(0)
            meta["fields"][f.name] = {"kind": "sparse", "size": int(rows[0].numel())}
        elif isinstance(values[0], torch.Tensor):
            tensors[f.name] = torch.stack([v.detach().cpu() for v in values]).contiguous()
            meta["fields"][f.name] = {"kind": "dense"}
        elif isinstance(values[0], (bool, int, float)):
            kind = "float" if isinstance(values[0], float) else "int"
            # host: statistics written to storage
            tensors[f.name] = torch.tensor(values, dtype=torch.float64 if kind == "float" else torch.int64)
            meta["fields"][f.name] = {"kind": kind}
        else:
            raise StatsError(f"SampleStats field {f.name!r} has a type this store cannot write "
                             f"({type(values[0]).__name__})")
    return save(tensors, metadata={"saev": json.dumps(meta)})


def stats_from_bytes(data: bytes, where: str = "<bytes>") -> list[SampleStats]:
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise StatsError(f"{where}: not a sample-statistics file ({exc})") from exc
    return _decode(tensors, _metadata(data, where), where)


def _metadata(data: bytes, where: str) -> dict:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    if "saev" not in meta:
        raise StatsError(f"{where}: no sample-statistics metadata")
    meta = json.loads(meta["saev"])
    if meta.get("format") != FORMAT:
        raise StatsError(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _decode(tensors: dict[str, torch.Tensor], meta: dict, where: str) -> list[SampleStats]:
    ids = meta["sample_id"]
    wanted = {f.name for f in dataclasses.fields(SampleStats)} - {"sample_id"}
    missing = wanted - set(meta["fields"])
    if missing:
        raise StatsError(f"{where}: fields {sorted(missing)} missing (written by another version?)")
    columns: dict[str, list] = {}
    for name in wanted:
        spec = meta["fields"][name]
        if spec["kind"] == "sparse":
            idx, val, ptr = (tensors[f"{name}.{p}"] for p in ("idx", "val", "ptr"))
            rows = []
            for i in range(len(ids)):
                row = torch.zeros(spec["size"], dtype=val.dtype)  # host: statistics read from storage
                lo, hi = int(ptr[i]), int(ptr[i + 1])
                row[idx[lo:hi].long()] = val[lo:hi]
                rows.append(row)
            columns[name] = rows
        elif spec["kind"] == "dense":
            columns[name] = list(tensors[name].unbind(0))
        elif spec["kind"] == "none":
            columns[name] = [None] * len(ids)
        elif spec["kind"] == "json":
            columns[name] = spec["values"]
        else:
            columns[name] = tensors[name].tolist()
    return [SampleStats(sample_id=sid, **{k: v[i] for k, v in columns.items()}) for i, sid in enumerate(ids)]


def write_stats(uri: str, stats: list[SampleStats], storage_options: dict | None = None) -> int:
    """Write atomically; returns the bytes stored."""
    data = stats_bytes(stats)
    storage.write_bytes(uri, data, storage_options)
    return len(data)


def read_stats(uri: str, storage_options: dict | None = None) -> list[SampleStats]:
    return stats_from_bytes(storage.read_bytes(uri, storage_options), uri)
