"""Format errors and a failed validation gate are refusals: the command line prints them as one
paragraph ("<stage> refused the run. ..."), exits 2 and never calls them internal errors, whether
they come from the CLI's preflight or from inside the flow."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import flows.cli as cli
from saev_core.data.formats import FormatError
from saev_core.data.gx_results import ExpectationOutcome, ValidationFailed, ValidationResult
from saev_core.data.ingest import IngestStream
from saev_core.pipeline.preflight import is_permanent
from saev_core.refusal import Refusal
from tiny_mllms import build_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("model")))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _config(tmp_path, model_dir, uri) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"uri": str(uri)},
                                    "model": {"model_id": model_dir, "layer": 1, "device": "cpu"},
                                    "output": {"uri": str(tmp_path / "out"), "run_id": "r1"}}))
    return str(path)


def _refused(capsys, argv, stage, *phrases) -> str:
    rc = cli.main(argv)
    out = capsys.readouterr()
    text = out.err + out.out
    flat = " ".join(text.split())
    assert rc == 2, text
    assert "Traceback" not in text and "internal error" not in text, text
    assert f"{stage} refused the run." in flat, text
    for phrase in phrases:
        assert phrase in flat, (phrase, text)
    paragraph = text.split("(traceback")[0]
    assert paragraph.count("saev-curate: error:") == 1 and len(paragraph.strip().splitlines()) <= 12, text
    return flat


def test_cli_preflight_names_columns_that_differ_in_case(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAEV_CURATE_LOG_DIR", str(tmp_path / "logs"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"Question": "q", "Image": "a.png", "Chosen": "y", "Rejected": "n"}) + "\n")
    _refused(capsys, ["run", "--config", _config(tmp_path, model_dir, data)], "preflight",
             "dataset.uri", "'Question' for 'question'", "dataset.format=mapping")
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["q"]), pa.array([_png(0)]), pa.array(["a"]), pa.array(["b"]),
                                         pa.array(["r"])], names=["question", "image", "chosen", "chosen", "rejected"]),
                   dup)
    _refused(capsys, ["run", "--config", _config(tmp_path, model_dir, dup)], "preflight",
             "dup.parquet", "more than one column named ['chosen']")
    assert not (tmp_path / "out").exists()  # refused before the flow: no run folder, no _failed/ evidence


def _failing_flow(monkeypatch, exc):
    """The flow raises ``exc`` (as it would from its ingest or publish stage); the CLI is real."""
    import flows.curate

    def curate(params):
        raise exc

    monkeypatch.setattr(flows.curate, "curate", curate)
    monkeypatch.setattr(cli, "_start_api_server", lambda *a, **k: None)


def test_cli_format_error_raised_inside_the_flow_is_one_paragraph(model_dir, tmp_path, capsys, monkeypatch):
    """Preflight reads the first file only; a later file of the folder that is a JSON array is
    refused when ingest reaches it."""
    monkeypatch.setenv("SAEV_CURATE_LOG_DIR", str(tmp_path / "logs"))
    folder = tmp_path / "ds"
    folder.mkdir()
    pq_row = {"question": "q", "image": {"bytes": None, "path": "a.png"}, "chosen": "y", "rejected": "n"}
    (folder / "a.png").write_bytes(_png(0))
    (folder / "a.jsonl").write_text(json.dumps(pq_row) + "\n")
    (folder / "b.jsonl").write_text(json.dumps([pq_row]) + "\n")
    with pytest.raises(FormatError) as err:
        for _ in IngestStream(str(folder)):
            pass
    exc = err.value
    assert isinstance(exc, Refusal) and is_permanent(exc) and exc.stage == "ingest"
    assert pickle.loads(pickle.dumps(exc)).paragraph() == exc.paragraph()  # through Dask/Prefect intact
    _failing_flow(monkeypatch, exc)
    _refused(capsys, ["run", "--config", _config(tmp_path, model_dir, folder)], "ingest",
             "b.jsonl", "JSON array", "JSON lines")


def test_cli_failed_validation_gate_is_one_paragraph(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAEV_CURATE_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "image": _png(0), "chosen": "a", "rejected": "b"}]), data)
    result = ValidationResult(
        [ExpectationOutcome("quarantine.rate", "expect_column_max_to_be_between", False,
                            {"column": "quarantine_rate", "max_value": 0.2}, {"observed_value": 0.6}),
         ExpectationOutcome("scores.score_not_null", "expect_column_values_to_not_be_null", True)],
        suites=["scores", "quarantine"])
    exc = ValidationFailed(result)
    assert isinstance(exc, Refusal) and exc.stage == "validation"
    assert exc.evidence["failed"] == ["quarantine.rate"] and json.dumps(exc.evidence)
    again = pickle.loads(pickle.dumps(exc))
    assert again.result.failed_names == ["quarantine.rate"] and again.paragraph() == exc.paragraph()
    _failing_flow(monkeypatch, exc)
    _refused(capsys, ["run", "--config", _config(tmp_path, model_dir, data)], "validation",
             "quarantine.rate", "observed 0.6", "validation.max_quarantine_rate")
