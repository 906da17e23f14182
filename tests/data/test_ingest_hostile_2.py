"""Hostile datasets a user could plausibly bring, fed to the real ingest (second round).

Each of the known layouts (RLAIF-V, Align-Anything, TRL, a mapping) with the variations real
exports have: images as ``{bytes, path}`` structs, raw bytes, relative/absolute paths, lists of
one, nulls; responses as strings, message lists, empty, identical, of the wrong type; extra
columns; JSON lines with a BOM, CRLF and a broken line; Parquet with ``large_string``,
dictionary-encoded and nested columns; zero-row files; files whose later rows go bad; pixel
bombs and truncated images; image paths that leave the dataset folder. Every row ends kept
(with exactly its texts) or quarantined with a reason whose detail names the column; a source
that cannot be read as a whole is refused with one paragraph naming the file/column.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data.formats import ColumnMapping, FormatError
from saev_core.data.ingest import IngestStream, ingest_to_storage, read_ingest_summary
from saev_core.data.records import Reason, decode_extra
from saev_core.refusal import Refusal


def png(seed: int, size: int = 8) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int, size: int = 64) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (3.6 Gpx): must never be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def ingest_all(source, fmt="auto", **kw):
    stream = IngestStream(str(source), fmt, **kw)
    batches = list(stream)
    records = pa.concat_tables([b.records for b in batches]) if batches else None
    quarantine = pa.concat_tables([b.quarantine for b in batches]) if batches else None
    st = stream.stats
    assert st.kept + st.quarantined == st.rows_in, "a row was dropped silently"
    kept = {} if records is None else {r["row_index"]: r for r in records.to_pylist()}
    q = {} if quarantine is None else {r["row_index"]: r for r in quarantine.to_pylist()}
    assert not set(kept) & set(q)
    return kept, q, st


def write_jsonl(path, rows, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in raw_lines:
            fh.write(line + "\n")
    return path


# ----------------------------------------------------------------------------- RLAIF-V, Parquet


def test_rlaif_v_parquet_image_variants_and_wrong_types(tmp_path):
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png(1))
    (tmp_path / "outside.png").write_bytes(png(2))
    struct_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        ({"bytes": png(0), "path": "whatever.png"}, "q0", "good", "bad", None),  # bytes win, path ignored
        ({"bytes": None, "path": "img/a.png"}, "q1", "good", "bad", None),  # relative path
        ({"bytes": None, "path": str(root / "img" / "a.png")}, "q2", "good", "bad", None),  # absolute inside
        ({"bytes": None, "path": "../outside.png"}, "q3", "good", "bad", Reason.UNSAFE_IMAGE_PATH),
        ({"bytes": None, "path": str(tmp_path / "outside.png")}, "q4", "good", "bad", Reason.UNSAFE_IMAGE_PATH),
        ({"bytes": None, "path": "file://" + str(tmp_path / "outside.png")}, "q5", "good", "bad",
         Reason.UNSAFE_IMAGE_PATH),
        ({"bytes": None, "path": "http://169.254.169.254/latest/meta-data"}, "q6", "good", "bad",
         Reason.REMOTE_IMAGE_NOT_ALLOWED),
        (None, "q7", "good", "bad", Reason.MISSING_IMAGE),
        ({"bytes": None, "path": None}, "q8", "good", "bad", Reason.MISSING_IMAGE),
        ({"bytes": png(3), "path": None}, "q9", "", "bad", Reason.EMPTY_CHOSEN),
        ({"bytes": png(4), "path": None}, "q10", "same", " same ", Reason.IDENTICAL_RESPONSES),
        ({"bytes": png(5), "path": None}, None, "good", "bad", Reason.EMPTY_PROMPT),
        ({"bytes": png(6), "path": None}, "q12", "good", None, Reason.EMPTY_REJECTED),
    ]
    table = pa.table({
        "image": pa.array([r[0] for r in rows], struct_t),
        "question": pa.array([r[1] for r in rows], pa.large_string()),
        "chosen": pa.array([r[2] for r in rows], pa.string()).dictionary_encode(),
        "rejected": pa.array([r[3] for r in rows], pa.large_string()).dictionary_encode(),
        "meta": pa.array([{"source": "x", "scores": [1, 2]}] * len(rows),
                         pa.struct([("source", pa.string()), ("scores", pa.list_(pa.int64()))])),
    })
    pq.write_table(table, root / "train.parquet")
    kept, q, st = ingest_all(root / "train.parquet")
    assert st.format == "rlaif_v"
    for i, r in enumerate(rows):
        if r[-1] is None:
            assert i in kept, (i, q.get(i))
            assert (kept[i]["prompt"], kept[i]["chosen"], kept[i]["rejected"]) == (r[1], r[2], r[3])
            assert decode_extra(kept[i]["extra"])["meta"] == {"source": "x", "scores": [1, 2]}
        else:
            assert q[i]["reason"] == r[-1], (i, q[i])
    assert kept[0]["image"] == png(0)
    assert kept[1]["image"] == kept[2]["image"] == png(1)
    # the detail names what is wrong, in the user's column terms
    assert "chosen" in q[9]["detail"] and "rejected" in q[12]["detail"] and "question" in q[11]["detail"]
    assert "null" in q[12]["detail"] and "null" in q[11]["detail"]  # a null is not reported as an empty string


def test_wrong_typed_response_columns_in_parquet_are_not_coerced(tmp_path):
    """An int64 ``chosen`` column (``5`` must not become ``"5"``) and a struct ``rejected``."""
    t = pa.table({
        "question": ["q0", "q1"],
        "image": pa.array([png(0), png(1)], pa.large_binary()),
        "chosen": pa.array([5, 6], pa.int64()),
        "rejected": pa.array([{"text": "no"}, {"text": "nope"}], pa.struct([("text", pa.string())])),
    })
    pq.write_table(t, tmp_path / "d.parquet")
    kept, q, st = ingest_all(tmp_path / "d.parquet")
    assert not kept
    assert {r["reason"] for r in q.values()} == {Reason.INVALID_TYPE}
    assert "chosen" in q[0]["detail"] and "int" in q[0]["detail"]


# ----------------------------------------------------------------------------- RLAIF-V, JSON lines


def test_jsonl_text_variants_each_kept_exactly_or_named(tmp_path):
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png(1))
    b64 = base64.b64encode(png(7)).decode()
    rows = [
        ({"image": "img/a.png", "chosen": "good", "rejected": "bad"}, None),
        ({"image": ["img/a.png"], "chosen": "good 1", "rejected": "bad"}, None),  # a list of one image
        ({"image": {"bytes": b64, "path": None}, "chosen": "good 2", "rejected": "bad"}, None),  # base64 bytes
        ({"image": "data:image/png;base64," + b64, "chosen": "good 3", "rejected": "bad"}, None),
        ({"image": "img/a.png", "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
          "rejected": [{"role": "assistant", "content": "no"}]}, None),
        ({"image": "img/a.png", "chosen": 5, "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": "img/a.png", "chosen": 2.5, "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": "img/a.png", "chosen": True, "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": "img/a.png", "chosen": {"a": {"b": 1}}, "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": "img/a.png", "chosen": "good", "rejected": 10**30}, Reason.INVALID_TYPE),
        ({"image": "img/a.png", "chosen": "", "rejected": "bad"}, Reason.EMPTY_CHOSEN),
        ({"image": "img/a.png", "chosen": "   \n", "rejected": "bad"}, Reason.EMPTY_CHOSEN),
        ({"image": "img/a.png", "chosen": "x", "rejected": "x"}, Reason.IDENTICAL_RESPONSES),
        ({"image": "img/a.png", "rejected": "bad"}, Reason.EMPTY_CHOSEN),  # the key is absent
        ({"image": ["img/a.png", "img/a.png"], "chosen": "good 4", "rejected": "bad"}, None),  # extra image noted
        ({"image": [], "chosen": "good", "rejected": "bad"}, Reason.MISSING_IMAGE),
        ({"image": [None], "chosen": "good", "rejected": "bad"}, Reason.MISSING_IMAGE),
        ({"image": [None, "img/a.png"], "chosen": "good", "rejected": "bad"}, Reason.MISSING_IMAGE),
        ({"image": 7, "chosen": "good", "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": {"bytes": 12, "path": None}, "chosen": "good", "rejected": "bad"}, Reason.INVALID_TYPE),
        ({"image": {"bytes": "%%%not base64", "path": None}, "chosen": "good", "rejected": "bad"},
         Reason.IMAGE_DECODE_ERROR),
    ]
    lines = []
    for i, (r, _) in enumerate(rows):
        lines.append(json.dumps({"question": f"q{i}", **r, "idx": i, "Extra Col": [i, None]}))
    lines.append('{"question": "q", "chosen": NaN, "rejected": "bad", "image": "img/a.png"}')  # json.loads takes NaN
    path = root / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kept, q, st = ingest_all(path)
    for i, (r, reason) in enumerate(rows):
        if reason is None:
            assert i in kept, (i, q.get(i))
            assert decode_extra(kept[i]["extra"])["Extra Col"] == [i, None]
        else:
            assert q[i]["reason"] == reason, (i, q[i])
    assert kept[4]["chosen"] == "ok" and kept[4]["rejected"] == "no"
    assert kept[2]["image"] == kept[3]["image"] == png(7)
    assert decode_extra(kept[14]["extra"])["_saev_images_dropped"] == 1
    nan_row = len(rows)
    assert q[nan_row]["reason"] == Reason.INVALID_TYPE and "chosen" in q[nan_row]["detail"]
    for i in (5, 6, 7, 8):
        assert "chosen" in q[i]["detail"], q[i]
    assert "missing" in q[13]["detail"]  # an absent key is told apart from an empty string
    assert "first of 2 images is null" in q[17]["detail"]  # not "image is null": the row has an image


def test_jsonl_bom_crlf_broken_line_and_blank_lines(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    rows = [{"question": f"q{i}", "image": {"bytes": None, "path": "a.png"}, "chosen": f"c{i}", "rejected": "r"}
            for i in range(4)]
    (root / "a.png").write_bytes(png(0))
    body = "\r\n".join([json.dumps(rows[0]), json.dumps(rows[1]), '{"question": "q", "chosen": ', "",
                        json.dumps(rows[2]), "   ", json.dumps(rows[3])]) + "\r\n"
    path = root / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    kept, q, st = ingest_all(path)
    assert st.format == "rlaif_v"  # detected through the BOM
    assert sorted(kept) == [0, 1, 4, 6]
    assert [kept[i]["chosen"] for i in (0, 1, 4, 6)] == ["c0", "c1", "c2", "c3"]  # no stray \r
    assert q[2]["reason"] == Reason.MALFORMED_ROW and "line 3" in q[2]["detail"]
    assert st.rows_in == 5


def test_later_rows_go_bad_after_the_format_was_detected(tmp_path):
    """Detection looks at the first lines only; a later row with other types or keys is that row's
    problem, every good row is still kept."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").write_bytes(png(0))
    good = [{"question": f"q{i}", "image": "a.png", "chosen": f"c{i}", "rejected": "r"} for i in range(300)]
    bad = [
        {"question": "q", "image": "a.png", "chosen": ["c"], "rejected": "r"},
        {"Question": "q", "image": "a.png", "chosen": "c-late", "rejected": "r"},  # the key changed case
        {"question": "q", "image": {"path": "../../etc/passwd"}, "chosen": "c", "rejected": "r"},
        ["not", "an", "object"],
    ]
    path = write_jsonl(root / "d.jsonl", good + bad)
    kept, q, st = ingest_all(path, batch_rows=64)
    assert len(kept) == 300 and st.rows_in == 304
    assert q[300]["reason"] == Reason.INVALID_TYPE
    assert q[301]["reason"] == Reason.EMPTY_PROMPT and "question" in q[301]["detail"]
    assert q[302]["reason"] == Reason.UNSAFE_IMAGE_PATH
    assert q[303]["reason"] == Reason.MALFORMED_ROW


def test_a_later_parquet_file_with_other_types_quarantines_its_rows_only(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    pq.write_table(pa.table({"question": ["a", "b"], "image": [png(0), png(1)], "chosen": ["c", "d"],
                             "rejected": ["e", "f"]}), root / "part-0.parquet")
    pq.write_table(pa.table({"question": ["g"], "image": [png(2)], "chosen": pa.array([1.5]),
                             "rejected": ["h"]}), root / "part-1.parquet")
    kept, q, st = ingest_all(root)
    assert sorted(kept) == [0, 1] and q[2]["reason"] == Reason.INVALID_TYPE
    assert q[2]["source_file"] == "part-1.parquet"


# ----------------------------------------------------------------------------- other layouts


def test_align_anything_preference_values(tmp_path):
    rows = [
        (1, "a", "b", None), (2, "a", "b", None), (1.0, "a", "b", None),
        ("1", "a", "b", Reason.INVALID_TYPE), (True, "a", "b", Reason.INVALID_TYPE),
        (3, "a", "b", Reason.BAD_PREFERENCE_INDEX), (None, "a", "b", Reason.BAD_PREFERENCE_INDEX),
        (1, "", "b", Reason.EMPTY_CHOSEN), (2, "", "b", Reason.EMPTY_REJECTED), (1, "same", "same", Reason.IDENTICAL_RESPONSES),
        (1, 4, "b", Reason.INVALID_TYPE),
    ]
    lines = [json.dumps({"question": f"q{i}", "image": {"bytes": None, "path": "a.png"}, "response_1": r1,
                         "response_2": r2, "overall_response": pref}) for i, (pref, r1, r2, _) in enumerate(rows)]
    lines.append(json.dumps({"question": "qn", "image": "a.png", "response_1": "a", "response_2": "b"})[:-1]
                 + ', "overall_response": NaN}')
    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    kept, q, st = ingest_all(tmp_path / "d.jsonl")
    assert st.format == "align_anything"
    for i, (_, _, _, reason) in enumerate(rows):
        if reason is None:
            assert i in kept, q.get(i)
        else:
            assert q[i]["reason"] == reason, (i, q[i])
    assert (kept[0]["chosen"], kept[0]["rejected"]) == ("a", "b")
    assert (kept[1]["chosen"], kept[1]["rejected"]) == ("b", "a")
    assert q[len(rows)]["reason"] == Reason.INVALID_TYPE and "overall_response" in q[len(rows)]["detail"]
    # the empty/wrong response is named by its column, not only by its role
    assert "response_1" in q[7]["detail"] and "response_1" in q[8]["detail"] and "response_1" in q[10]["detail"]


def test_trl_message_lists_and_image_lists(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").write_bytes(png(0))

    def msgs(role, text, image=False):
        parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return [{"role": role, "content": parts}]

    rows = [
        ({"prompt": [{"role": "system", "content": "be brief"}] + msgs("user", "what?", image=True),
          "images": [{"bytes": base64.b64encode(png(1)).decode(), "path": None}], "chosen": msgs("assistant", "cat"),
          "rejected": msgs("assistant", "dog")}, None),
        ({"prompt": "what?", "images": ["a.png"], "chosen": "cat", "rejected": "dog 1"}, None),
        ({"prompt": "what?", "images": None, "chosen": "cat", "rejected": "dog"}, Reason.MISSING_IMAGE),
        ({"prompt": "what?", "images": [png(1).hex()], "chosen": "cat", "rejected": "dog"}, Reason.IMAGE_NOT_FOUND),
        ({"prompt": msgs("user", "what?"), "images": ["a.png"], "chosen": msgs("assistant", "same"),
          "rejected": msgs("assistant", "same")}, Reason.IDENTICAL_RESPONSES),
        ({"prompt": "what?", "images": ["a.png"], "chosen": [{"role": "assistant", "content": [{"type": "text",
                                                                                             "text": 5}]}],
          "rejected": "dog"}, Reason.INVALID_TYPE),
        ({"prompt": "what?", "images": ["a.png"], "chosen": [{"role": "assistant", "text": "cat"}],
          "rejected": "dog"}, Reason.INVALID_TYPE),
        ({"prompt": "what?", "images": ["a.png"], "chosen": [{"role": "assistant", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "content": "cat"}]}], "rejected": "dog"}, Reason.INVALID_TYPE),
        ({"prompt": "what?", "images": ["a.png"], "chosen": [{"role": "assistant", "content": [
            {"type": "output_text", "text": "cat"}]}], "rejected": "dog"}, Reason.INVALID_TYPE),
        ({"prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "hm?"}]}],
          "images": ["a.png"], "chosen": "cat 2", "rejected": "dog"}, None),  # Parquet-style parts: text null
        ({"prompt": "what?", "images": ["https://example.invalid/a.png"], "chosen": "cat", "rejected": "dog"},
         Reason.REMOTE_IMAGE_NOT_ALLOWED),
    ]
    path = write_jsonl(root / "d.jsonl", [r for r, _ in rows])
    kept, q, st = ingest_all(path)
    assert st.format == "trl"
    for i, (_, reason) in enumerate(rows):
        if reason is None:
            assert i in kept, q.get(i)
        else:
            assert q[i]["reason"] == reason, (i, q[i])
    assert kept[0]["prompt"] == "be brief\n\nwhat?" and kept[0]["chosen"] == "cat" and kept[0]["image"] == png(1)


def test_mapped_columns_with_spaces_and_case(tmp_path):
    (tmp_path / "a.png").write_bytes(png(0))
    rows = [{"My Question": "q", "Pic": "a.png", "Best Answer": "yes", "Worst answer": "no", "n": 1},
            {"My Question": "q", "Pic": "a.png", "Best Answer": 3, "Worst answer": "no", "n": 2}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    m = ColumnMapping(prompt="My Question", image="Pic", chosen="Best Answer", rejected="Worst answer")
    kept, q, st = ingest_all(path, "mapping", mapping=m)
    assert kept[0]["chosen"] == "yes" and decode_extra(kept[0]["extra"]) == {"n": 1}
    assert q[1]["reason"] == Reason.INVALID_TYPE and "Best Answer" in q[1]["detail"]


@pytest.mark.parametrize("columns", [
    ["Question", "Image", "Chosen", "Rejected"],
    ["question ", "image", " chosen", "rejected"],
])
def test_columns_that_differ_in_case_or_spaces_are_refused_with_the_likely_match(tmp_path, columns):
    """Never matched silently (which column was meant is the user's call), but the refusal names
    the near-miss and says how to map it, in one paragraph."""
    (tmp_path / "a.png").write_bytes(png(0))
    row = dict(zip(columns, ["q", "a.png", "yes", "no"]))
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(FormatError) as err:
        IngestStream(str(path))
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    odd = [c for c in columns if c.strip().lower() != c][0]
    assert repr(odd) in text and "mapping" in text


# ----------------------------------------------------------------------------- images


def test_pixel_bomb_truncated_and_odd_images(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    full = jpeg(1)
    images = [
        (png(0), None),
        (png_bomb(), Reason.IMAGE_TOO_LARGE),
        (full[: len(full) // 2], Reason.IMAGE_DECODE_ERROR),  # a truncated JPEG
        (png(2, 32)[:-30], Reason.IMAGE_DECODE_ERROR),  # a truncated PNG
        (b"GIF89a", Reason.IMAGE_DECODE_ERROR),
        (b"<html>404 not found</html>", Reason.IMAGE_DECODE_ERROR),
    ]
    t = pa.table({"question": [f"q{i}" for i in range(len(images))],
                  "image": pa.array([{"bytes": b, "path": None} for b, _ in images],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "chosen": ["c"] * len(images), "rejected": ["r"] * len(images)})
    pq.write_table(t, root / "d.parquet")
    kept, q, st = ingest_all(root / "d.parquet")
    for i, (_, reason) in enumerate(images):
        if reason is None:
            assert i in kept
        else:
            assert q[i]["reason"] == reason, (i, q[i])
    assert "60000" in q[1]["detail"]


def test_image_paths_that_leave_the_dataset_folder_are_not_opened(tmp_path):
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    (root / "img" / "in.png").write_bytes(png(0))
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "s.png").write_bytes(png(1))
    os.symlink(outside, root / "img" / "linkdir")  # a symlinked folder leading out
    os.symlink(root / "img" / "in.png", root / "img" / "inner_link.png")  # a symlink that stays inside
    cases = [
        ("img/in.png", None),
        ("img/inner_link.png", None),
        ("./img/../img/in.png", None),
        ("img/linkdir/s.png", Reason.UNSAFE_IMAGE_PATH),
        ("img/../../secret/s.png", Reason.UNSAFE_IMAGE_PATH),
        (str(outside / "s.png"), Reason.UNSAFE_IMAGE_PATH),
        ("//" + str(outside / "s.png").lstrip("/"), Reason.UNSAFE_IMAGE_PATH),
        ("file://" + str(outside / "s.png"), Reason.UNSAFE_IMAGE_PATH),
        ("file:" + str(outside / "s.png"), Reason.UNSAFE_IMAGE_PATH),
        ("FILE://" + str(outside / "s.png"), Reason.UNSAFE_IMAGE_PATH),
        ("HTTPS://example.invalid/s.png", Reason.REMOTE_IMAGE_NOT_ALLOWED),
        ("ftp://example.invalid/s.png", Reason.REMOTE_IMAGE_NOT_ALLOWED),
        ("s3://other/s.png", Reason.REMOTE_IMAGE_NOT_ALLOWED),
        ("img", Reason.IMAGE_NOT_FOUND),  # a folder, not an image
    ]
    rows = [{"question": f"q{i}", "image": {"bytes": None, "path": p}, "chosen": f"c{i}", "rejected": "r"}
            for i, (p, _) in enumerate(cases)]
    path = write_jsonl(root / "d.jsonl", rows)
    kept, q, st = ingest_all(path)
    for i, (p, reason) in enumerate(cases):
        if reason is None:
            assert i in kept and kept[i]["image"] == png(0), (p, q.get(i))
        else:
            assert q[i]["reason"] == reason, (p, q[i])
            assert "not opened" in q[i]["detail"] or "not fetched" in q[i]["detail"] or reason == Reason.IMAGE_NOT_FOUND


# ----------------------------------------------------------------------------- whole-input refusals


def test_zero_row_parquet_ends_with_no_rows_and_a_refusal_downstream(tmp_path):
    t = pa.table({"question": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                  "chosen": pa.array([], pa.string()), "rejected": pa.array([], pa.string())})
    pq.write_table(t, tmp_path / "empty.parquet")
    summary = ingest_to_storage(str(tmp_path / "empty.parquet"), str(tmp_path / "out"))
    assert summary["rows_in"] == 0 and summary["kept"] == 0
    assert read_ingest_summary(str(tmp_path / "out"))["rows_in"] == 0


def test_zero_row_jsonl_with_auto_format_is_one_paragraph_refusal(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"\xef\xbb\xbf\r\n\r\n")
    with pytest.raises(FormatError) as err:
        IngestStream(str(tmp_path / "empty.jsonl"))
    assert "empty.jsonl" in str(err.value) and "format" in str(err.value)


def test_format_errors_are_refusals_with_one_paragraph(tmp_path):
    """A source that cannot be read in the requested layout is a permanent Refusal naming the
    file and the columns, so the command line prints one paragraph and exits 2."""
    write_jsonl(tmp_path / "d.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(Refusal) as err:
        IngestStream(str(tmp_path / "d.jsonl"))
    assert isinstance(err.value, FormatError)
    assert err.value.stage == "ingest" and "d.jsonl" in err.value.where
    assert "\n" not in err.value.paragraph() and "foo" in err.value.paragraph()
    with pytest.raises(Refusal, match="missing"):
        IngestStream(str(tmp_path / "d.jsonl"), "trl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(Refusal, match="unsupported file type"):
        IngestStream(str(tmp_path / "d.csv"))


def test_duplicate_parquet_column_names_refuse_the_file(tmp_path):
    """Two ``chosen`` columns: a row dict would silently keep the last one."""
    t = pa.Table.from_arrays([pa.array(["q"]), pa.array([png(0)]), pa.array(["a"]), pa.array(["b"]), pa.array(["r"])],
                             names=["question", "image", "chosen", "chosen", "rejected"])
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(FormatError, match=r"more than one column named \['chosen'\]") as err:
        list(IngestStream(str(tmp_path / "dup.parquet"), "rlaif_v"))
    assert "dup.parquet" in err.value.where and "\n" not in str(err.value)


def test_odd_image_values_get_short_details_that_say_what_to_do(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    os.mkfifo(root / "pipe.png")  # opening it would block the run forever
    b64 = base64.b64encode(png(0) * 50).decode()
    cases = [
        (b64, Reason.IMAGE_NOT_FOUND, "base64"),  # base64 without a data: prefix is not guessed at
        ("a" * 5000 + ".png", Reason.IMAGE_NOT_FOUND, "not found"),
        ("/" * 5000, Reason.UNSAFE_IMAGE_PATH, "outside"),
        ({"url": "https://example.invalid/a.png"}, Reason.INVALID_TYPE, "url"),
        ("pipe.png", Reason.IMAGE_NOT_FOUND, "not a regular file"),
    ]
    rows = [{"prompt": "q", "images": [img], "chosen": f"c{i}", "rejected": "r"} for i, (img, _, _) in enumerate(cases)]
    path = write_jsonl(root / "d.jsonl", rows)
    kept, q, st = ingest_all(path)
    for i, (_, reason, word) in enumerate(cases):
        assert q[i]["reason"] == reason, q[i]
        assert word in q[i]["detail"] and len(q[i]["detail"]) < 600, q[i]["detail"]
        assert q[i]["detail"].startswith("image (column 'images')"), q[i]["detail"]


@pytest.mark.parametrize("fmt", ["auto", "rlaif_v"])
@pytest.mark.parametrize("encode", [
    lambda t: t.encode("utf-16"),  # with this machine's byte order mark
    lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
    lambda t: t.encode("utf-32"),
    lambda t: b"\x00\x00\xfe\xff" + t.encode("utf-32-be"),
], ids=["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_utf16_jsonl_file_is_refused_by_name_not_quarantined_line_by_line(tmp_path, fmt, encode):
    """Windows tools save "Unicode" text as UTF-16: every line would be invalid UTF-8, and the run
    would end with N rows of invalid_encoding instead of one sentence saying how to fix the file."""
    text = json.dumps({"question": "q", "image": "a.png", "chosen": "a", "rejected": "b"}) + "\r\n"
    (tmp_path / "d.jsonl").write_bytes(encode(text))
    with pytest.raises(FormatError, match="UTF-16") as err:
        list(IngestStream(str(tmp_path / "d.jsonl"), fmt))
    assert err.value.where.endswith("d.jsonl") and "UTF-8" in err.value.fix


@pytest.mark.parametrize("doc", [
    {"question": "q", "image": "a.png", "chosen": "a", "rejected": "b"},
    [{"question": "q", "image": "a.png", "chosen": "a", "rejected": "b"}],
])
@pytest.mark.parametrize("fmt", ["auto", "rlaif_v"])
def test_indented_json_is_refused_as_a_whole_with_how_to_write_json_lines(tmp_path, doc, fmt):
    """``json.dump(obj, fh, indent=2)`` saved as .json: every line alone is broken JSON, so the run
    would end with N malformed rows (or "cannot detect the format") instead of saying what the file is."""
    (tmp_path / "d.json").write_text(json.dumps(doc, indent=2) + "\n")
    with pytest.raises(FormatError, match="JSON") as err:
        list(IngestStream(str(tmp_path / "d.json"), fmt))
    assert err.value.where.endswith("d.json") and "one object per line" in err.value.fix


def test_a_later_jsonl_file_without_the_layouts_keys_is_refused_like_a_parquet_one(tmp_path):
    """A ``metadata.jsonl`` beside ``train.jsonl`` (as image-folder datasets ship): its rows are not
    samples, and quarantining each as empty_prompt would hide that a wrong file is in the folder."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.png").write_bytes(png(0))
    write_jsonl(root / "train.jsonl", [{"question": "q", "image": "a.png", "chosen": "a", "rejected": "b"}])
    write_jsonl(root / "z_metadata.jsonl", [{"file_name": "a.png", "caption": "x"}])
    with pytest.raises(FormatError, match=r"missing columns \['question', 'image', 'chosen', 'rejected'\]") as err:
        list(IngestStream(str(root)))
    assert err.value.where.endswith("z_metadata.jsonl") and "file_name" in str(err.value)
    # a later file whose rows merely leave a key out now and then is read row by row
    write_jsonl(root / "z_metadata.jsonl", [{"question": "q2", "image": "a.png", "chosen": "c", "rejected": "d"},
                                            {"question": "q3", "image": "a.png", "chosen": "c"}])
    kept, q, st = ingest_all(root)
    assert len(kept) == 2 and list(q.values())[0]["reason"] == Reason.EMPTY_REJECTED


def test_a_copy_of_a_quarantined_row_is_kept_and_a_duplicate_names_the_kept_row(tmp_path):
    """Row 0 is quarantined for its passthrough column (a lone surrogate); row 1, the same sample
    with a clean column, must be kept, not called a duplicate of a row that was never kept."""
    (tmp_path / "a.png").write_bytes(png(0))
    sample = {"question": "q", "image": "a.png", "chosen": "a", "rejected": "b"}
    lines = [json.dumps({**sample, "note": "x"})[:-1] + ', "bad": "\\ud800"}', json.dumps({**sample, "note": "y"}),
             json.dumps({**sample, "note": "z"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    kept, q, st = ingest_all(tmp_path / "d.jsonl")
    assert q[0]["reason"] == Reason.INVALID_ENCODING
    assert list(kept) == [1] and decode_extra(kept[1]["extra"])["note"] == "y"
    assert q[2]["reason"] == Reason.DUPLICATE and "row 1" in q[2]["detail"]


def test_source_file_of_a_quarantined_row_is_unambiguous_in_nested_folders(tmp_path):
    root = tmp_path / "ds"
    for part in ("a", "b"):
        (root / part).mkdir(parents=True)
        (root / part / "x.png").write_bytes(png(ord(part)))
        write_jsonl(root / part / "train.jsonl", [{"question": "q", "image": "x.png", "chosen": part, "rejected": "r"},
                                                  {"question": "q", "image": "nope.png", "chosen": part, "rejected": "r"}])
    kept, q, st = ingest_all(root)
    assert [e["source_file"] for e in q.values()] == ["a/train.jsonl", "b/train.jsonl"]
