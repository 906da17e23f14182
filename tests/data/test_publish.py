"""Publishing a run to a local folder and to a real S3 server (moto on loopback), read back
with datasets.load_dataset; manifest last; refusal to overwrite; atomic objects."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data import passthrough
from saev_core.data import publish
from saev_core.data import storage
from saev_core.data import subsets
from saev_core.data import validation
from saev_core.data.gx_results import raise_if_failed
from saev_core.data.records import CanonicalRecord, QuarantineEntry, Reason, records_to_table
from saev_core.data.selection import n_keep, top_percent


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (seed * 40 % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


def make_records(n: int) -> pa.Table:
    return records_to_table(
        CanonicalRecord.build(i, f"question {i}", png(i), f"good {i}", f"bad {i}", {"idx": i}) for i in range(n)
    )


def publish_run(run: str, so=None, n: int = 10, percents=(50, 20)):
    """What the flow does: scores + subsets + quarantine, validate, validation.json, manifest."""
    records = make_records(n)
    ids = records.column("sample_id").to_pylist()
    scores = [float((i * 7) % n) for i in range(n)]
    publish.write_scores(run, {"sample_id": ids, "score": scores, "raw_cosine": [0.5] * n}, so)
    infos = {}
    for p in percents:
        chosen = {ids[i]: scores[i] for i in top_percent(ids, scores, p)}
        batches = [records.slice(0, 4), records.slice(4)]  # streamed in pieces
        infos[p] = subsets.write_subset(run, p, batches, chosen, so, row_group_rows=2)
    publish.write_quarantine(run, [QuarantineEntry(n, None, Reason.MISSING_IMAGE, "image is null")], so)
    result = validation.validate_run(
        run,
        expected_rows=n,
        keep_percents=percents,
        rows_in=n + 1,
        quarantined=1,
        kept=n,
        max_quarantine_rate=0.2,
        storage_options=so,
    )
    raise_if_failed(result)
    publish.write_validation(run, result, so)
    manifest = {
        "run_id": "r1",
        "counts": {"rows_in": n + 1, "kept": n, "quarantined": 1},
        "subsets": {subsets.subset_name(p): infos[p].rows for p in percents},
        "storage_options": dict(so or {}),
        "validation": {"success": result.success},
    }
    publish.write_manifest(run, manifest, so)
    return records, ids, scores, infos


def test_publish_to_s3_and_load_with_datasets(s3_bucket, tmp_path, monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    so = s3_bucket.storage_options
    run = publish.run_uri(s3_bucket.uri("out"), "toy", "r1")
    assert run == s3_bucket.uri("out", "toy", "r1")
    assert not publish.is_complete(run, so)
    records, ids, scores, infos = publish_run(run, so)
    assert infos[50].rows == n_keep(10, 50) == 5 and infos[20].rows == 2
    assert publish.is_complete(run, so)

    manifest = publish.read_manifest(run, so)
    assert manifest["subsets"] == {"top-50": 5, "top-20": 2}
    assert manifest["storage_options"]["secret"] == "***" and manifest["storage_options"]["key"] == "***"
    assert manifest["storage_options"]["endpoint_url"] == so["endpoint_url"]
    raw = storage.read_bytes(storage.join(run, "manifest.json"), so).decode()
    assert so["secret"] not in raw.replace('"***"', "")
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {
        "scores.parquet",
        "quarantine.parquet",
        "validation.json",
        "subsets/top-50/part-00000.parquet",
        "subsets/top-20/part-00000.parquet",
    }
    assert storage.read_json(storage.join(run, "validation.json"), so)["success"] is True

    ds = datasets.load_dataset(
        "parquet",
        data_files=storage.join(run, "subsets", "top-50", "*.parquet"),
        storage_options=dict(so),  # datasets adds an "hf" entry to the dict it is given
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.num_rows == 5
    assert isinstance(ds.features["images"].feature, datasets.Image)
    row = ds[0]
    assert set(row) == {"prompt", "chosen", "rejected", "images", "sample_id", "score"}
    assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)
    by_id = {r["sample_id"]: r for r in records.to_pylist()}
    for r in ds:
        src = by_id[r["sample_id"]]
        assert (r["prompt"], r["chosen"], r["rejected"]) == (src["prompt"], src["chosen"], src["rejected"])
        assert r["score"] == scores[ids.index(r["sample_id"])]
        assert r["images"][0].tobytes() == Image.open(io.BytesIO(src["image"])).tobytes()

    # a published run is never written again
    with pytest.raises(publish.RunAlreadyPublished, match="already published"):
        publish.write_scores(run, {"sample_id": ["x"], "score": [1.0]}, so)
    with pytest.raises(publish.RunAlreadyPublished):
        subsets.SubsetWriter(run, 50, so)
    with pytest.raises(publish.RunAlreadyPublished):
        publish.write_manifest(run, {"again": True}, so)
    assert publish.read_manifest(run, so)["run_id"] == "r1"


def test_manifest_last_local(tmp_path):
    run = publish.run_uri(str(tmp_path / "out"), "toy", "r2")
    with pytest.raises(FileNotFoundError, match="scores.parquet has not been written"):
        publish.write_manifest(run, {"x": 1})
    with pytest.raises(publish.RunIncomplete, match="incomplete"):
        publish.read_manifest(run)
    publish_run(run)
    assert publish.is_complete(run)
    assert sorted(subsets.list_subsets(run)) == ["top-20", "top-50"]
    # the manifest is the newest file of the run
    files = [os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs]
    newest = max(files, key=lambda f: os.stat(f).st_mtime_ns)
    assert newest.endswith("manifest.json")
    assert not [f for f in files if os.path.basename(f).startswith(".")]  # no temp files left
    with pytest.raises(publish.RunAlreadyPublished):
        publish.write_quarantine(run, [])
    # local datasets load too
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=os.path.join(run, "subsets", "top-20", "*.parquet"), split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert isinstance(ds[0]["images"][0], Image.Image)


def test_bad_names_and_subset_naming(tmp_path):
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            publish.run_uri(str(tmp_path), bad, "r1")
    assert subsets.subset_name(50) == "top-50"
    assert subsets.subset_name(12.5) == "top-12.5"
    assert subsets.subset_name(100) == "top-100"
    with pytest.raises(ValueError):
        subsets.subset_name(0)
    with pytest.raises(ValueError):
        subsets.subset_name(150)


def _where(where: str, request, tmp_path, name: str) -> tuple[dict | None, str]:
    """(storage options, output root) on the moto S3 server or on local disk."""
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return bucket.storage_options, bucket.uri(name)
    return None, str(tmp_path / "out")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_failed_subset_write_leaves_no_object(where, tmp_path, request):
    so, base = _where(where, request, tmp_path, "out")
    run = publish.run_uri(base, "toy", "r3")
    records = make_records(4)
    scores = {s: 1.0 for s in records.column("sample_id").to_pylist()}
    with pytest.raises(RuntimeError, match="boom"):
        with subsets.SubsetWriter(run, 50, so) as w:
            w.write_records(records, scores)
            raise RuntimeError("boom")
    assert storage.list_files(storage.join(run, "subsets"), so) == []
    assert not storage.exists(subsets.subset_uri(run, 50) + "/part-00000.parquet", so)
    # rollover into several parts, all readable, and an empty subset is still a valid file
    with subsets.SubsetWriter(run, 50, so, rows_per_part=3) as w:
        w.write_records(records, scores)
        w.write_records(records.slice(0, 0), scores)
    assert [storage.basename(f) for f in w.files] == ["part-00000.parquet", "part-00001.parquet"]
    with storage.open_input(w.files[1], so) as fh:
        assert pq.read_table(fh).num_rows == 1
    info = subsets.write_subset(run, 10, [records], {}, so)
    assert info.rows == 0 and len(info.files) == 1
    with storage.open_input(info.files[0], so) as fh:
        t = pq.read_table(fh)
    assert t.num_rows == 0 and b"huggingface" in t.schema.metadata


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_helpers(where, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        so, base = bucket.storage_options, bucket.uri("st")
    else:
        so, base = {"endpoint_url": "ignored-for-local", "key": "k", "secret": "s"}, str(tmp_path / "st")
    a = storage.join(base, "x", "a.json")
    assert not storage.exists(a, so)
    storage.write_json(a, {"v": 1}, so)
    assert storage.exists(a, so) and storage.read_json(a, so) == {"v": 1}
    storage.write_json(a, {"v": 2}, so)  # overwrite allowed by default
    with pytest.raises(FileExistsError):
        storage.write_json(a, {"v": 3}, so, overwrite=False)
    assert storage.read_json(a, so) == {"v": 2}
    storage.write_bytes(storage.join(base, "x", "b.bin"), b"\x00\x01", so)
    storage.write_bytes(storage.join(base, "y", "_SUCCESS"), b"", so)
    assert storage.list_files(base, so) == [storage.join(base, "x", "a.json"), storage.join(base, "x", "b.bin")]
    assert storage.list_files(base, so, suffixes=".bin") == [storage.join(base, "x", "b.bin")]
    assert storage.read_bytes(storage.join(base, "x", "b.bin"), so) == b"\x00\x01"
    assert storage.parent(a) == storage.join(base, "x") and storage.basename(a) == "a.json"


def test_redaction():
    so = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}, "key": "AKIA", "secret": "S3CR3T", "token": "T"}
    norm = storage.normalize_storage_options(so)
    assert norm["endpoint_url"] == "http://127.0.0.1:1" and "client_kwargs" not in norm and "region_name" not in norm
    red = storage.redact_storage_options(so)
    assert red == {"endpoint_url": "http://127.0.0.1:1", "key": "***", "secret": "***", "token": "***"}
    deep = storage.redact_secrets({"a": [{"aws_secret_access_key": "x", "n": 1}], "password": "p"})
    assert deep == {"a": [{"aws_secret_access_key": "***", "n": 1}], "password": "***"}
    assert "S3CR3T" not in json.dumps(red)


def test_passthrough_columns_reach_scores_and_subsets(tmp_path):
    import datasets

    extras = [{"ds_name": "RLAIF-V", "idx": str(1000 + i), "origin_dataset": "OKVQA", "rating": i / 2,
               "score": f"src{i}", "_saev_images_dropped": 1} for i in range(6)]
    extras[5] = {"ds_name": "RLAIF-V", "idx": "1005", "unknown": [1, 2]}  # a column only some rows have
    records = records_to_table(CanonicalRecord.build(i, f"q{i}", png(i), f"good {i}", f"bad {i}", extras[i])
                               for i in range(6))
    ids = records.column("sample_id").to_pylist()
    schema = passthrough.passthrough_schema([records.slice(0, 3), records.slice(3)], reserved=subsets.SUBSET_COLUMNS)
    assert schema.names == ["ds_name", "idx", "origin_dataset", "rating", "source_score", "unknown"]
    assert schema.field("rating").type == pa.float64() and schema.field("unknown").type == pa.list_(pa.int64())
    run = publish.run_uri(str(tmp_path / "out"), "toy", "pt")
    scores = pa.table({"sample_id": ids[::-1], "score": [float(i) for i in range(6)]})
    publish.write_scores(run, passthrough.add_passthrough(scores, [records.slice(0, 2), records.slice(2)]))
    back = {r["sample_id"]: r for r in publish.read_scores(run).to_pylist()}
    assert back[ids[2]]["idx"] == "1002" and back[ids[2]]["rating"] == 1.0 and back[ids[5]]["unknown"] == [1, 2]
    assert back[ids[0]]["source_score"] == "src0" and back[ids[0]]["score"] == 5.0
    assert "_saev_images_dropped" not in back[ids[0]]  # the adapters' notes are not source columns
    info = subsets.write_subset(run, 50, [records], {ids[i]: float(i) for i in (3, 4, 5)},
                                passthrough=schema)
    ds = datasets.load_dataset("parquet", data_files=info.files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds[0]["images"][0], Image.Image)  # the HF features still decode images
    rows = {r["sample_id"]: r for r in ds}
    assert rows[ids[3]]["source_score"] == "src3" and rows[ids[3]]["score"] == 3.0
    assert rows[ids[4]]["origin_dataset"] == "OKVQA" and rows[ids[5]]["origin_dataset"] is None
    assert rows[ids[5]]["unknown"] == [1, 2] and rows[ids[4]]["idx"] == "1004"


def _stage(run, so=None):
    staging = publish.begin_run(run, so)
    publish_run(staging, so)
    return staging


@pytest.mark.parametrize("where", ["local", "s3"])
def test_staged_publish_is_invisible_until_promoted(where, tmp_path, request):
    so, base = _where(where, request, tmp_path, "staged")
    dataset = storage.join(base, "toy")
    run = publish.run_uri(base, "toy", "r9")
    staging = _stage(run, so)
    assert publish.list_runs(dataset, so) == [] and not storage.exists(run, so)
    assert storage.list_files(base, so) == []  # the staging prefix is skipped by readers
    publish.promote(staging, run, so)
    assert publish.list_runs(dataset, so) == [run] and publish.is_complete(run, so)
    assert not storage.exists(staging, so)
    assert not storage.exists(storage.parent(staging), so)  # no empty staging folder left beside the runs
    assert sorted(subsets.list_subsets(run, so)) == ["top-20", "top-50"]
    with pytest.raises(publish.RunAlreadyPublished):
        publish.begin_run(run, so)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interrupted_promote_leaves_nothing_a_reader_takes_for_a_run(where, tmp_path, request, monkeypatch):
    so, base = _where(where, request, tmp_path, "killed")
    dataset = storage.join(base, "toy")
    run = publish.run_uri(base, "toy", "r10")
    staging = _stage(run, so)
    if where == "s3":  # the store dies between two file copies
        calls = {"n": 0}
        real = publish._copy_object

        def dying_copy(*a):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ConnectionError("S3 went away")
            return real(*a)

        monkeypatch.setattr(publish, "_copy_object", dying_copy)
    else:  # the process dies during the rename
        monkeypatch.setattr(publish.os, "rename", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises((ConnectionError, KeyboardInterrupt)):
        publish.promote(staging, run, so)
    monkeypatch.undo()
    if where == "s3":
        assert len(storage.list_files(run, so)) == 2  # two files copied before the store died
    assert publish.list_runs(dataset, so) == [] and not publish.is_complete(run, so)
    with pytest.raises(publish.RunIncomplete):
        publish.read_manifest(run, so)
    # the next run cleans what is old enough, and the same run id can be published again
    assert publish.clean_incomplete(dataset, so, min_age_seconds=3600) == []  # too young: maybe in flight
    removed = publish.clean_incomplete(dataset, so, min_age_seconds=0)
    assert staging in removed and storage.list_files(dataset, so) == []
    publish.promote(_stage(run, so), run, so)
    assert publish.list_runs(dataset, so) == [run]


def test_run_ids_unique_within_one_second():
    ids = {publish.new_run_id("abc123") for _ in range(200)}
    assert len(ids) == 200 and all(i.split("-")[1] == "abc123" for i in ids)
