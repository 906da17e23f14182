"""Ingest adapters on small files in each source's real layout, every quarantine reason,
counts, sample-id stability, sharding, and reading from S3."""

from __future__ import annotations

import base64
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data import ingest
from saev_core.data import storage
from saev_core.data.formats import ColumnMapping, FormatError
from saev_core.data.ingest import IngestStream, iter_shards
from saev_core.data.records import REASONS, Reason, compute_sample_id, decode_extra


def png(seed: int, size: int = 8) -> bytes:
    img = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((0, 0), (seed % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED_PNG = png(999, size=64)[:-40]  # header fine, pixel data cut


def run(stream: IngestStream):
    batches = list(stream)
    records = pa.concat_tables([b.records for b in batches])
    quarantine = pa.concat_tables([b.quarantine for b in batches])
    for b in batches:
        assert b.rows_in == b.records.num_rows + b.quarantine.num_rows
    return records, quarantine, stream.stats


def reasons(quarantine: pa.Table) -> dict[int, str]:
    return dict(zip(quarantine.column("row_index").to_pylist(), quarantine.column("reason").to_pylist()))


def write_parquet(path, rows, schema=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def write_jsonl(path, rows, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


RLAIF_SCHEMA = pa.schema(
    [
        ("ds_name", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("origin_dataset", pa.string()),
        ("origin_split", pa.string()),
        ("idx", pa.string()),
        ("image_path", pa.string()),
    ]
)


def rlaif_row(i, image=None, question=None, chosen=None, rejected=None):
    return {
        "ds_name": "RLAIF-V",
        "image": {"bytes": png(i), "path": None} if image is None else image,
        "question": f"What is in picture {i}?" if question is None else question,
        "chosen": f"A red square number {i}." if chosen is None else chosen,
        "rejected": f"A blue circle number {i}." if rejected is None else rejected,
        "origin_dataset": "OKVQA",
        "origin_split": json.dumps({"model": "x"}),
        "idx": str(1000 + i),
        "image_path": f"okvqa/{i}.jpg",
    }


@pytest.fixture
def rlaif_file(tmp_path):
    rows = [rlaif_row(i) for i in range(4)]
    rows += [
        rlaif_row(4, image={"bytes": b"this is not an image", "path": None}),  # 4 undecodable
        rlaif_row(5, image={"bytes": None, "path": None}),  # 5 missing
        rlaif_row(6, question="   "),  # 6 empty prompt
        rlaif_row(7, chosen=""),  # 7 empty chosen
        rlaif_row(8, rejected=None) | {"rejected": None},  # 8 empty rejected (null)
        rlaif_row(9, chosen="same answer", rejected=" same answer"),  # 9 identical
        rlaif_row(0),  # 10 duplicate of row 0
        rlaif_row(11, image={"bytes": TRUNCATED_PNG, "path": None}),  # 11 truncated pixels
    ]
    return write_parquet(tmp_path / "rlaif" / "train-00000.parquet", rows, RLAIF_SCHEMA)


def test_rlaif_v_parquet_every_reason(rlaif_file):
    stream = IngestStream(rlaif_file, "auto", batch_rows=3)
    assert stream.format == "rlaif_v"
    records, quarantine, stats = run(stream)
    assert records.column("row_index").to_pylist() == [0, 1, 2, 3]
    assert reasons(quarantine) == {
        4: Reason.IMAGE_DECODE_ERROR,
        5: Reason.MISSING_IMAGE,
        6: Reason.EMPTY_PROMPT,
        7: Reason.EMPTY_CHOSEN,
        8: Reason.EMPTY_REJECTED,
        9: Reason.IDENTICAL_RESPONSES,
        10: Reason.DUPLICATE,
        11: Reason.IMAGE_DECODE_ERROR,
    }
    assert stats.rows_in == 12 == stats.kept + stats.quarantined
    assert stats.by_reason[Reason.IMAGE_DECODE_ERROR] == 2
    # the duplicate names the kept row's id; missing image -> no id
    q = {r["row_index"]: r for r in quarantine.to_pylist()}
    assert q[10]["sample_id"] == records.column("sample_id")[0].as_py()
    assert q[5]["sample_id"] is None and q[4]["sample_id"] is not None
    assert all(r["detail"] for r in q.values())
    # canonical fields and untouched passthrough columns
    r0 = records.to_pylist()[0]
    assert r0["prompt"] == "What is in picture 0?" and r0["image"] == png(0)
    assert (r0["chosen"], r0["rejected"]) == ("A red square number 0.", "A blue circle number 0.")
    extra = decode_extra(r0["extra"])
    assert extra == {
        "ds_name": "RLAIF-V",
        "origin_dataset": "OKVQA",
        "origin_split": json.dumps({"model": "x"}),
        "idx": "1000",
        "image_path": "okvqa/0.jpg",
    }
    assert r0["sample_id"] == compute_sample_id(png(0), r0["prompt"], r0["chosen"], r0["rejected"])


def test_sample_id_stable_and_sensitive(rlaif_file):
    a, _, sa = run(IngestStream(rlaif_file, "rlaif_v"))
    b, _, sb = run(IngestStream(rlaif_file, "rlaif_v", batch_rows=1))
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    assert sa.fingerprint == sb.fingerprint
    base = compute_sample_id(png(1), "p", "c", "r")
    assert base == compute_sample_id(png(1), "p", "c", "r") and len(base) == 32
    variants = [
        compute_sample_id(png(2), "p", "c", "r"),
        compute_sample_id(png(1), "p ", "c", "r"),
        compute_sample_id(png(1), "p", "C", "r"),
        compute_sample_id(png(1), "p", "c", "r."),
        compute_sample_id(png(1), "p", "r", "c"),  # swapped preference
    ]
    assert len({base, *variants}) == 6
    # length prefixes: moving a boundary changes the id
    assert compute_sample_id(b"img", "ab", "c", "d") != compute_sample_id(b"img", "a", "bc", "d")
    assert compute_sample_id(b"img", "", "xc", "d") != compute_sample_id(b"imgx", "", "c", "d")


def align_row(i, pref, image):
    return {
        "question": f"Describe image {i}.",
        "image": image,
        "response_1": f"first answer {i}",
        "response_2": f"second answer {i}",
        "overall_response": pref,
        "prompt_following_rate_1": 3,
        "prompt_following_rate_2": 2,
        "overall_textfeedback": "ok",
    }


def test_align_anything_jsonl_relative_paths(tmp_path):
    root = tmp_path / "aa"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"{i}.png").write_bytes(png(i))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [
        align_row(0, 1, "images/0.png"),
        align_row(1, 2, "images/1.png"),
        align_row(2, 2.0, "images/2.png"),  # integral float (Parquet int column with nulls) accepted
        align_row(3, 3, "images/0.png"),  # bad index
        align_row(4, None, "images/0.png"),  # bad index
        align_row(5, 1, "images/nope.png"),  # missing file
        align_row(6, 1, "images/broken.png"),  # undecodable
        align_row(7, 1, None),  # missing
    ]
    path = write_jsonl(root / "train.jsonl", rows, extra_lines=["{not json", "[1, 2]", ""])
    stream = IngestStream(path, "auto", batch_rows=4)
    assert stream.format == "align_anything"
    records, quarantine, stats = run(stream)
    got = records.to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in got] == [
        ("first answer 0", "second answer 0"),
        ("second answer 1", "first answer 1"),
        ("second answer 2", "first answer 2"),
    ]
    assert [r["image"] for r in got] == [png(0), png(1), png(2)]
    assert decode_extra(got[0]["extra"]) == {
        "prompt_following_rate_1": 3,
        "prompt_following_rate_2": 2,
        "overall_textfeedback": "ok",
    }
    assert reasons(quarantine) == {
        3: Reason.BAD_PREFERENCE_INDEX,
        4: Reason.BAD_PREFERENCE_INDEX,
        5: Reason.IMAGE_NOT_FOUND,
        6: Reason.IMAGE_DECODE_ERROR,
        7: Reason.MISSING_IMAGE,
        8: Reason.MALFORMED_ROW,
        9: Reason.MALFORMED_ROW,
    }
    assert stats.rows_in == 10 == stats.kept + stats.quarantined  # blank line is not a row


def test_align_anything_parquet_image_bytes(tmp_path):
    rows = [align_row(i, 1 + i % 2, png(i)) for i in range(3)] + [align_row(3, 0, png(3))]
    path = write_parquet(tmp_path / "aa.parquet", rows)
    records, quarantine, stats = run(IngestStream(path, "align_anything"))
    assert records.num_rows == 3 and reasons(quarantine) == {3: Reason.BAD_PREFERENCE_INDEX}
    assert records.column("chosen").to_pylist()[1] == "second answer 1"


def trl_row(i, images, prompt=None):
    return {
        "prompt": prompt
        if prompt is not None
        else [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is shown in {i}?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"good {i}"}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"bad {i}"}]}],
        "images": images,
        "source": "rlaif-v_formatted",
    }


def test_trl_parquet_message_lists(tmp_path):
    img = lambda i: {"bytes": png(i), "path": f"{i}.png"}  # noqa: E731
    rows = [
        trl_row(0, [img(0)]),
        trl_row(1, [img(1), img(2)]),  # two images: first kept, noted in extra
        trl_row(2, []),  # missing
        trl_row(3, [img(3)], prompt=[{"role": "user", "content": [{"type": "image"}]}]),  # empty prompt
    ]
    path = write_parquet(tmp_path / "trl.parquet", rows)
    stream = IngestStream(path, "auto")
    assert stream.format == "trl"
    records, quarantine, _ = run(stream)
    got = records.to_pylist()
    assert [r["prompt"] for r in got] == ["What is shown in 0?", "What is shown in 1?"]
    assert [(r["chosen"], r["rejected"]) for r in got] == [("good 0", "bad 0"), ("good 1", "bad 1")]
    assert got[1]["image"] == png(1)
    assert decode_extra(got[1]["extra"]) == {"source": "rlaif-v_formatted", "_saev_images_dropped": 1}
    assert decode_extra(got[0]["extra"]) == {"source": "rlaif-v_formatted"}
    assert reasons(quarantine) == {2: Reason.MISSING_IMAGE, 3: Reason.EMPTY_PROMPT}

    _, q2, _ = run(IngestStream(path, "trl", multi_image="quarantine"))
    assert reasons(q2)[1] == Reason.MULTIPLE_IMAGES


def test_trl_jsonl_strings_and_path_lists(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(5))
    rows = [
        {"prompt": "<image>Caption this.", "chosen": "a cat", "rejected": "a dog", "images": ["imgs/a.png"]},
        {"prompt": "Caption this too.", "chosen": "x", "rejected": "y", "images": None},
        {"prompt": "b64", "chosen": "x", "rejected": "y", "images": [{"bytes": base64.b64encode(png(6)).decode()}]},
        {"prompt": "uri", "chosen": "x", "rejected": "y", "images": ["data:image/png;base64," + base64.b64encode(png(7)).decode()]},
        {"prompt": "bad64", "chosen": "x", "rejected": "y", "images": [{"bytes": "%%%not base64"}]},
    ]
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    records, quarantine, _ = run(IngestStream(path, "trl"))
    assert records.column("image").to_pylist() == [png(5), png(6), png(7)]
    assert records.column("prompt").to_pylist() == ["<image>Caption this.", "b64", "uri"]
    assert reasons(quarantine) == {1: Reason.MISSING_IMAGE, 4: Reason.IMAGE_DECODE_ERROR}


def test_explicit_mapping_direct_and_indexed(tmp_path):
    rows = [
        {"q": "why?", "pic": png(i), "good": f"because {i}", "bad": "no", "a": "A", "b": f"B{i}", "label": i % 2}
        for i in range(3)
    ]
    rows.append({"q": "why?", "pic": png(9), "good": "g", "bad": "b", "a": "A", "b": "B", "label": 2})
    path = write_parquet(tmp_path / "custom.parquet", rows)
    with pytest.raises(FormatError) as err:
        IngestStream(path, "auto")
    msg = str(err.value)
    assert "rlaif_v: missing ['question', 'image', 'chosen', 'rejected']" in msg and "trl: missing" in msg

    direct = ColumnMapping(prompt="q", image="pic", chosen="good", rejected="bad")
    records, quarantine, _ = run(IngestStream(path, "mapping", mapping=direct))
    assert records.num_rows == 4 and quarantine.num_rows == 0
    assert set(decode_extra(records.column("extra")[0].as_py())) == {"a", "b", "label"}

    indexed = {"prompt": "q", "image": "pic", "responses": ["a", "b"], "preferred": "label", "preferred_base": 0}
    records, quarantine, _ = run(IngestStream(path, "mapping", mapping=indexed))
    assert [(r["chosen"], r["rejected"]) for r in records.to_pylist()] == [("A", "B0"), ("B1", "A"), ("A", "B2")]
    assert reasons(quarantine) == {3: Reason.BAD_PREFERENCE_INDEX}

    with pytest.raises(FormatError, match=r"needs columns \['nope'\]"):
        IngestStream(path, "mapping", mapping=ColumnMapping(prompt="nope", image="pic", chosen="good", rejected="bad"))
    with pytest.raises(FormatError, match=r"'rlaif_v' needs columns \['question', 'image', 'chosen', 'rejected'\]"):
        IngestStream(path, "rlaif_v")
    with pytest.raises(ValueError, match="either chosen= and rejected="):
        ColumnMapping(prompt="q", image="pic")


def test_folder_of_parquet_with_relative_paths_per_file(tmp_path):
    root = tmp_path / "ds"
    for part in ("a", "b"):
        (root / part / "img").mkdir(parents=True)
    (root / "a" / "img" / "x.png").write_bytes(png(1))
    (root / "b" / "img" / "x.png").write_bytes(png(2))  # same relative path, other folder
    mk = lambda i: {"question": f"q{i}", "image": {"bytes": None, "path": "img/x.png"}, "chosen": "c", "rejected": "r"}  # noqa: E731
    write_parquet(root / "a" / "part-0.parquet", [mk(0), mk(1)])
    write_parquet(root / "b" / "part-1.parquet", [mk(2)])
    (root / "a" / "README.md").write_text("not data")
    (root / "a" / ".hidden.parquet").write_bytes(b"junk")
    records, quarantine, stats = run(IngestStream(str(root), "auto", batch_rows=1))
    assert records.column("row_index").to_pylist() == [0, 1, 2]
    assert records.column("image").to_pylist() == [png(1), png(1), png(2)]
    assert len(stats.files) == 2 and quarantine.num_rows == 0


def test_json_array_is_refused_and_unknown_suffix(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"question": "a", "image": "x.png", "chosen": "c", "rejected": "r"}]))
    with pytest.raises(FormatError, match="JSON array"):
        IngestStream(str(p), "rlaif_v")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(FormatError, match="unsupported file type"):
        IngestStream(str(tmp_path / "x.csv"))


def test_shards_are_deterministic_and_account_for_every_row(rlaif_file, tmp_path):
    rows = [rlaif_row(i) for i in range(7)]
    rows.insert(3, rlaif_row(50, question=""))
    rows.append(rlaif_row(51, chosen=""))  # trailing quarantine goes to the last shard
    path = write_parquet(tmp_path / "s.parquet", rows, RLAIF_SCHEMA)
    shards = list(IngestStream(path, batch_rows=2).shards(3))
    assert [s.records.num_rows for s in shards] == [3, 3, 1]
    assert [s.start for s in shards] == [0, 3, 6]
    assert [s.quarantine.num_rows for s in shards] == [0, 1, 1]  # row 3 falls after shard 0
    assert sum(s.rows_in for s in shards) == 9
    again = list(IngestStream(path, batch_rows=5).shards(3))
    assert [s.records.column("sample_id").to_pylist() for s in shards] == [
        s.records.column("sample_id").to_pylist() for s in again
    ]
    assert ingest.shard_index(6, 3) == 2 and shards[2].name == "shard-00002"

    # nothing usable: one empty shard carrying the quarantine
    bad = write_parquet(tmp_path / "bad.parquet", [rlaif_row(1, question="")], RLAIF_SCHEMA)
    only = list(iter_shards(IngestStream(bad), 4))
    assert len(only) == 1 and only[0].records.num_rows == 0 and only[0].quarantine.num_rows == 1


def test_ingest_to_storage_local(rlaif_file, tmp_path):
    out = str(tmp_path / "work" / "ingest")
    summary = ingest.ingest_to_storage(rlaif_file, out, shard_rows=3, batch_rows=5)
    assert summary["rows_in"] == 12 and summary["kept"] == 4 and summary["quarantined"] == 8
    assert [s["rows"] for s in summary["shards"]] == [3, 1]
    assert ingest.read_ingest_summary(out)["fingerprint"] == summary["fingerprint"]
    shard0 = ingest.read_record_shard(ingest.list_record_shards(out)[0])
    assert shard0.schema.names == ["sample_id", "row_index", "prompt", "image", "chosen", "rejected", "extra"]
    q = pq.read_table(os.path.join(out, "quarantine.parquet"))
    assert q.num_rows == 8 and set(q.column("reason").to_pylist()) <= set(REASONS)


def test_ingest_from_s3_with_relative_image_paths(s3_bucket, tmp_path):
    so = s3_bucket.storage_options
    for i in range(2):
        storage.write_bytes(s3_bucket.uri("ds", "images", f"{i}.png"), png(i), so)
    rows = [
        {"question": f"q{i}", "image": {"bytes": None, "path": f"images/{i}.png"}, "chosen": "c", "rejected": "r"}
        for i in range(2)
    ]
    rows.append({"question": "q9", "image": {"bytes": None, "path": "images/9.png"}, "chosen": "c", "rejected": "r"})
    local = write_parquet(tmp_path / "t.parquet", rows)
    with open(local, "rb") as fh:
        storage.write_bytes(s3_bucket.uri("ds", "train.parquet"), fh.read(), so)
    stream = IngestStream(s3_bucket.uri("ds"), "auto", storage_options=so)
    records, quarantine, stats = run(stream)
    assert records.column("image").to_pylist() == [png(0), png(1)]
    assert reasons(quarantine) == {2: Reason.IMAGE_NOT_FOUND}
    assert stats.files == [s3_bucket.uri("ds", "train.parquet")]
