"""Failures a user can read and act on (issue 24): no silent coercion in ingest, unreadable files
refused by name and never retried, a refused run keeps its evidence in <dataset>/_failed/<run_id>/,
the ranking gate says what would change its outcome, and the CLI ends every failure in one
paragraph (exit 2 for a refusal, 1 for an internal error) with the traceback in a log file."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data import publish, storage
from saev_core.data.ingest import IngestStream, NoUsableRows
from saev_core.data.source_files import UnreadableFile
from saev_core.data.records import Reason
from saev_core.pipeline.preflight import ConfigError, check_dataset, is_permanent
from saev_core.refusal import Refusal

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CLI = str(ROOT / ".venv" / "bin" / "saev-curate") if (ROOT / ".venv" / "bin" / "saev-curate").exists() else None


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _row(i: int, **kw) -> dict:
    return {"question": f"what is in picture {i}?", "image": f"img{i}.png", "chosen": f"a thing {i}",
            "rejected": f"nothing {i}", **kw}


def _jsonl_dataset(folder: Path, lines: list[bytes], images: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (folder / f"img{i}.png").write_bytes(_png(i))
    path = folder / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _line(i: int, **kw) -> bytes:
    return json.dumps(_row(i, **kw)).encode()


def _quarantine(path) -> dict[int, dict]:
    rows = {}
    for batch in IngestStream(str(path), "rlaif_v"):
        for q in batch.quarantine.to_pylist():
            rows[q["row_index"]] = q
    return rows


# ------------------------------------------------------------------------------ ingest: no coercion
def test_invalid_utf8_line_is_quarantined_with_its_line_not_replaced(tmp_path):
    bad = _line(1).replace(b"picture 1", b"picture \xff\xfe1")
    path = _jsonl_dataset(tmp_path / "d", [_line(0), bad, _line(2)])
    stream = IngestStream(str(path), "rlaif_v")
    kept = [r for b in stream for r in b.records.to_pylist()]
    assert [r["row_index"] for r in kept] == [0, 2]
    assert not any("\ufffd" in r["prompt"] for r in kept)
    q = _quarantine(path)
    assert q[1]["reason"] == Reason.INVALID_ENCODING and "line 2" in q[1]["detail"] and "0xff" in q[1]["detail"]


def test_blank_lines_keep_row_index_equal_to_line_minus_one(tmp_path):
    lines = [_line(0), b"", b"   ", _line(1, chosen=""), b"", _line(2), b"{not json", _line(3, image="../../etc/passwd")]
    path = _jsonl_dataset(tmp_path / "d", lines)
    q = _quarantine(path)
    # file lines (1-based): 4 empty chosen, 7 bad JSON, 8 unsafe path
    assert {i: r["reason"] for i, r in q.items()} == {3: Reason.EMPTY_CHOSEN, 6: Reason.MALFORMED_ROW,
                                                       7: Reason.UNSAFE_IMAGE_PATH}
    assert "line 7" in q[6]["detail"]
    kept = [r["row_index"] for b in IngestStream(str(path), "rlaif_v") for r in b.records.to_pylist()]
    assert kept == [0, 5]
    # across files of a folder the numbering runs on by lines, blank lines included
    folder = tmp_path / "two"
    _jsonl_dataset(folder, [_line(0), b"", _line(1)])
    (folder / "data.jsonl").rename(folder / "a.jsonl")
    (folder / "b.jsonl").write_bytes(b"\n" + _line(2, chosen="") + b"\n")
    q2 = _quarantine(folder)
    assert list(q2) == [3 + 1] and q2[4]["source_file"] == "b.jsonl"


@pytest.mark.parametrize("path", ["img0.png\x00.txt", "img0\n.png", "img\x7f0.png", "img0\u202egnp.png"])
def test_control_characters_in_an_image_path_are_unsafe(tmp_path, path):
    file = _jsonl_dataset(tmp_path / "d", [_line(0, image=path), _line(1)])
    q = _quarantine(file)
    assert q[0]["reason"] == Reason.UNSAFE_IMAGE_PATH and "control character" in q[0]["detail"], q


def test_lone_surrogate_text_is_invalid_encoding(tmp_path):
    file = _jsonl_dataset(tmp_path / "d", [b'{"question": "bad \\ud800 text", "image": "img0.png", '
                                           b'"chosen": "a", "rejected": "b"}', _line(1)])
    q = _quarantine(file)
    assert q[0]["reason"] == Reason.INVALID_ENCODING and "U+D800" in q[0]["detail"]


def test_invalid_utf8_in_a_parquet_string_quarantines_only_its_row(tmp_path):
    questions = pa.array([b"fine question", b"bad \xff question", b"another"], pa.binary()).view(pa.string())
    table = pa.table({"question": questions, "image": [_png(i) for i in range(3)],
                      "chosen": ["a", "b", "c"], "rejected": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "d.parquet")
    stream = IngestStream(str(tmp_path / "d.parquet"), "rlaif_v")
    batches = list(stream)
    kept = [r["row_index"] for b in batches for r in b.records.to_pylist()]
    q = [r for b in batches for r in b.quarantine.to_pylist()]
    assert kept == [0, 2]
    assert [(r["row_index"], r["reason"]) for r in q] == [(1, Reason.INVALID_ENCODING)] and "question" in q[0]["detail"]


# ------------------------------------------------------------------------------ unreadable Parquet
def _parquet(path: Path, rows: int = 100, group: int = 25) -> bytes:
    t = pa.table({"question": [f"question {i}" * 5 for i in range(rows)], "image": [_png(i % 4) for i in range(rows)],
                  "chosen": [f"a{i}" for i in range(rows)], "rejected": [f"b{i}" for i in range(rows)]})
    pq.write_table(t, path, row_group_size=group)
    return path.read_bytes()


def test_a_truncated_parquet_file_is_named_not_blamed_on_a_config_key(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    data = _parquet(folder / "a.parquet")
    (folder / "b.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile) as err:
        check_dataset(str(folder))
    assert err.value.where.endswith("b.parquet") and "truncated" in str(err.value)
    assert not isinstance(err.value, ConfigError) and is_permanent(err.value)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(UnreadableFile, match="x.parquet"):  # a single (first) file: named too
        check_dataset(str(tmp_path / "x.parquet"))


def test_a_damaged_row_group_is_a_permanent_error_naming_file_group_and_rows(tmp_path):
    path = tmp_path / "d.parquet"
    data = bytearray(_parquet(path))
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start:start + 12] = b"\xff" * 12  # the page header of row group 1: the footer stays valid
    path.write_bytes(bytes(data))
    check_dataset(str(path))  # the footer reads fine: only decoding finds it
    with pytest.raises(UnreadableFile) as err:
        for _ in IngestStream(str(path), "rlaif_v"):
            pass
    e = err.value
    assert is_permanent(e) and e.stage == "ingest" and e.where == str(path)
    assert e.evidence["row_group"] == 1 and e.evidence["rows"] == [25, 49]
    assert "row group 1 of 4 (rows 25-49" in str(e) and "no row of a damaged file is used" in str(e)


def test_refusals_survive_pickling_with_every_field():
    e = UnreadableFile("s3://b/x.parquet", "row group 2 cannot be decoded", {"row_group": 2})
    e.kept_at = "runs/d/_failed/r"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is UnreadableFile and back.evidence["row_group"] == 2 and str(back) == str(e)
    c = pickle.loads(pickle.dumps(ConfigError("model.layer", "layer 9 is outside", "Set model.layer")))
    assert c.stage == "preflight" and c.where == "model.layer" and isinstance(c, Refusal)


def test_no_usable_rows_says_which_reasons():
    e = NoUsableRows("data.jsonl", {"rows_in": 3, "by_reason": {"invalid_encoding": 2, "image_not_found": 1},
                                    "files": ["data.jsonl"]})
    assert "none of its 3 rows is usable" in str(e) and "invalid_encoding: 2" in str(e) and is_permanent(e)
    assert "holds no rows" in str(NoUsableRows("empty.parquet", {"rows_in": 0, "files": ["empty.parquet"]}))


# ------------------------------------------------------------------------------ the _failed folder
def test_failed_run_folder_lifecycle(tmp_path):
    run = publish.run_uri(str(tmp_path / "out"), "ds", "r1")
    staging = publish.begin_run(run)
    storage.write_bytes(storage.join(staging, "canaries.parquet"), b"staged")
    work_q = str(tmp_path / "work" / "quarantine.parquet")
    storage.write_bytes(work_q, b"quarantine")
    kept = publish.keep_failed(run, {"stage": "ranking-gate", "reason": "cannot rank"},
                               files={"quarantine.parquet": work_q}, tables={"scores.parquet": pa.table({"x": [1]})})
    assert kept == str(tmp_path / "out" / "ds" / "_failed" / "r1")
    assert not os.path.exists(staging)  # nothing left where nothing points to it
    info = json.loads((Path(kept) / "FAILED.json").read_text())
    assert info["stage"] == "ranking-gate" and info["files"] == ["canaries.parquet", "quarantine.parquet",
                                                                 "scores.parquet"]
    assert (Path(kept) / "canaries.parquet").read_bytes() == b"staged"
    assert publish.list_runs(str(tmp_path / "out" / "ds")) == []  # never looks like a published run
    assert publish.clean_incomplete(str(tmp_path / "out" / "ds"), min_age_seconds=0) == []
    listed = publish.list_failed(str(tmp_path / "out" / "ds"))
    assert [(f["run_id"], f["stage"]) for f in listed] == [("r1", "ranking-gate")]
    assert publish.clean_failed(str(tmp_path / "out" / "ds"), max_age_days=1) == []
    old = time.time() - 3 * 86400
    for p in Path(kept).iterdir():
        os.utime(p, (old, old))
    assert publish.clean_failed(str(tmp_path / "out" / "ds"), max_age_days=2) == [kept]
    assert publish.list_failed(str(tmp_path / "out" / "ds")) == []


def test_failed_run_folder_on_s3(s3_bucket):
    so = s3_bucket.storage_options
    run = publish.run_uri(s3_bucket.uri("out"), "ds", "r2")
    staging = publish.begin_run(run, so)
    storage.write_bytes(storage.join(staging, "canaries.parquet"), b"staged", so)
    kept = publish.keep_failed(run, {"stage": "validation", "reason": "x"}, so)
    assert storage.read_bytes(storage.join(kept, "canaries.parquet"), so) == b"staged"
    assert not storage.exists(storage.join(staging, "canaries.parquet"), so)
    assert [f["stage"] for f in publish.list_failed(storage.parent(run), so)] == ["validation"]


# ------------------------------------------------------------------------------ the ranking gate's advice
def test_gate_refusal_names_figures_and_the_settings_that_would_change_it():
    from saev_core.sae.ranking_gate import check_ranking, refusal_advice

    ids = [f"{i:04d}" for i in range(40)]
    tied = [0.0] * 36 + [1.0, 2.0, 3.0, 4.0]  # a weight sum that is zero for most samples
    ranked = [float(i) for i in range(40)]
    out = check_ranking(ids, tied, [25, 50], method="reference", max_tie_share=0.05, needs_weights=True,
                        n_cross_modal=3, min_cross_modal=10)
    assert out["failures"]
    rows = [{"method": "raw_cosine", "kind": "image_swap", "paired_win_rate": 0.8},
            {"method": "reference", "kind": "image_swap", "paired_win_rate": 0.5}]
    found, fix, evidence = refusal_advice(
        out, method="reference", sample_ids=ids, scores_by_method={"reference": tied, "raw_cosine": ranked,
                                                                   "random": ranked},
        keep_percents=[25, 50], max_tie_share=0.05, needs_weights={"reference": True, "raw_cosine": False},
        n_cross_modal=3, min_cross_modal=10, canary_rows=rows,
        settings={"pool": "joint", "weight_samples": 1000, "expansion_factor": 16, "d_sae": 1024})
    assert "only 3 cross-modal features" in found and "picked by sample_id order" in found
    for phrase in ("scoring.method=raw_cosine", "win rate 0.80", "scoring.weights.pool=per_modality",
                   "scoring.weights.weight_samples, now 1000", "sae.expansion_factor, now 16", "win rate 0.80)", "validation.max_tie_share"):
        assert phrase in fix, phrase
    assert "random" not in fix  # passes every tie check, ranks nothing
    assert evidence["alternatives"]["raw_cosine"]["passes"] and evidence["canaries"] == rows
    # a pinned run cannot change its method, weights or SAE: only a new curation model version can
    _, pinned_fix, _ = refusal_advice(
        out, method="reference", sample_ids=ids, scores_by_method={"reference": tied, "raw_cosine": ranked},
        keep_percents=[25, 50], max_tie_share=0.05, needs_weights={"reference": True, "raw_cosine": False},
        n_cross_modal=3, min_cross_modal=10, canary_rows=rows,
        settings={"methods": ["reference", "raw_cosine"], "curation_model": "nightly@v2"})
    assert "a new version of the curation model nightly@v2" in pinned_fix
    assert "saev-curate promote RUN --name nightly" in pinned_fix and "scoring.method=raw_cosine" in pinned_fix
    assert "scoring.weights.pool" not in pinned_fix and "sae.expansion_factor" not in pinned_fix
    assert "validation.max_tie_share" in pinned_fix  # the pinned run's own gate setting still applies


# ------------------------------------------------------------------------------ the CLI
def test_cli_console_filter_keeps_one_line_per_record():
    import logging

    from flows.cli import _ConsoleFilter

    f = _ConsoleFilter()
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        import sys as _sys

        rec = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with exception: %r - "
                                "No retries configured", (ValueError("x\ny"),), _sys.exc_info())
    assert not f.filter(rec)  # an echo of the final failure, which the CLI prints once
    rec = logging.LogRecord("prefect", logging.WARNING, __file__, 1, "a warning\nwith detail", (), None)
    assert f.filter(rec) and rec.getMessage() == "a warning [...]" and rec.exc_info is None
    retry = logging.LogRecord("prefect", logging.ERROR, __file__, 1, "Task run failed with exception: "
                              "ConnectionError() - Retry 1/2 will start 2 second(s) from now", (), None)
    assert f.filter(retry)


def test_cli_internal_error_exits_1_with_a_log_file(monkeypatch, capsys, tmp_path):
    import flows.cli as cli

    monkeypatch.setenv("SAEV_CURATE_LOG_DIR", str(tmp_path / "logs"))

    def broken(argv, log=None):
        raise KeyError("a defect")

    monkeypatch.setattr(cli, "_main", broken)
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 6
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1 and str(logs[0]) in " ".join(err.split()) and "Traceback" in logs[0].read_text()
    with pytest.raises(KeyError):  # --debug: the traceback itself
        cli.main(["run", "--debug"])


def test_a_truncated_gzip_jsonl_is_refused_by_name_and_an_empty_file_ends_at_ingest(tmp_path):
    import gzip

    full = gzip.compress(b"\n".join(_line(i) for i in range(200)) + b"\n")
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(6):
        (folder / f"img{i}.png").write_bytes(_png(i))
    (folder / "data.jsonl.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(UnreadableFile, match="cannot be decompressed after line") as err:
        for _ in IngestStream(str(folder / "data.jsonl.gz"), "rlaif_v"):
            pass
    assert is_permanent(err.value) and err.value.where.endswith("data.jsonl.gz")
    (folder / "empty.jsonl").write_bytes(b"")
    stream = IngestStream(str(folder / "empty.jsonl"), "rlaif_v")  # explicit format: nothing to check
    assert sum(b.rows_in for b in stream) == 0
    with pytest.raises(ConfigError, match="no row to detect the format from"):
        check_dataset(str(folder / "empty.jsonl"))


def test_json_lines_that_would_crash_or_silently_resolve_are_malformed_rows(tmp_path):
    deep = b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = b'{"question": "q", "image": "img0.png", "chosen": "a", "rejected": "b", "n": ' + b"9" * 5000 + b"}"
    dup = b'{"question": "q", "image": "img0.png", "chosen": "good", "chosen": "bad", "rejected": "b"}'
    file = _jsonl_dataset(tmp_path / "d", [deep, huge, dup, _line(1)])
    q = _quarantine(file)
    assert {i: r["reason"] for i, r in q.items()} == {0: Reason.MALFORMED_ROW, 1: Reason.MALFORMED_ROW,
                                                       2: Reason.MALFORMED_ROW}
    assert "nested too deeply" in q[0]["detail"] and "'chosen' appears twice" in q[2]["detail"]


def test_a_lone_surrogate_in_a_passthrough_column_quarantines_its_row_not_the_batch(tmp_path):
    file = _jsonl_dataset(tmp_path / "d", [_line(0, note="bad \\ud83d half emoji").replace(b"\\\\ud83d", b"\\ud83d"),
                                           _line(1, note="fine")])
    batches = list(IngestStream(str(file), "rlaif_v"))
    q = [r for b in batches for r in b.quarantine.to_pylist()]
    assert [(r["row_index"], r["reason"]) for r in q] == [(0, Reason.INVALID_ENCODING)] and "note" in q[0]["detail"]
    assert [r["row_index"] for b in batches for r in b.records.to_pylist()] == [1]
