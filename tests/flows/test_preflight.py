"""Permanent errors fail before any work, in one paragraph: each bad input of the CLI checked for
the phrase that names it and for the absence of a traceback; Prefect does not retry them."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from flows.cli import main
from saev_core.data import publish, storage
from saev_core.pipeline.preflight import ConfigError, is_permanent
from tiny_mllms import build_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("model")))  # 4 decoder layers


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 40 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path):
    rows = [{"question": f"q{i}", "image": {"bytes": _png(i), "path": None}, "chosen": "a", "rejected": "b"}
            for i in range(3)]
    path = tmp_path / "data" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _config(tmp_path, **sections) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def _base(model_dir, dataset, tmp_path):
    return {"dataset": {"uri": dataset}, "model": {"model_id": model_dir, "layer": 1, "device": "cpu"},
            "output": {"uri": str(tmp_path / "out"), "run_id": "r1"}}


def _fails(capsys, argv, *phrases):
    rc = main(argv)
    out = capsys.readouterr()
    text = out.err + out.out
    assert rc == 2, text
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 6, text
    flat = " ".join(text.split())  # the paragraph is wrapped for the terminal
    for phrase in phrases:
        assert str(phrase) in flat, (phrase, text)
    return text


def test_unknown_keys_are_rejected_with_the_likely_key(tmp_path, capsys):
    cfg = _config(tmp_path, output={"keep_percent": [10]}, dataset={"formt": "trl"})
    _fails(capsys, ["run", "--config", cfg], "unknown key output.keep_percent", "did you mean output.keep_percents",
           "did you mean dataset.format", cfg)
    _fails(capsys, ["run", "--set", "model.layr=3"], "did you mean model.layer")
    _fails(capsys, ["run", "--set", "dataset.shard_rows=0"], "dataset.shard_rows", "greater than or equal to 1")


def test_a_scoring_key_from_before_the_nested_layout_names_its_new_key(tmp_path, capsys):
    """Issue 23 moved the weights' and the scores' parameters into scoring.weights and
    scoring.score: an old key is refused in one paragraph that names where it went."""
    _fails(capsys, ["run", "--set", "scoring.delta_quantile=0.5"], "scoring.delta_quantile",
           "now scoring.weights.delta_quantile", "--set scoring.weights.delta_quantile=0.5")
    cfg = _config(tmp_path, scoring={"top_k": 5, "pool": "per_modality"})
    _fails(capsys, ["run", "--config", cfg], "scoring.pool, scoring.top_k", "scoring.score.top_k",
           "scoring.weights.pool")
    cfg = _config(tmp_path, scoring={"delta_quantile": None, "delta": 2.0})
    # the suggested values are YAML (what --set reads): None is `null`, which parses back to None
    _fails(capsys, ["run", "--config", cfg], "--set scoring.weights.delta_quantile=null",
           "--set scoring.weights.delta=2.0", '"delta_quantile": null')
    from flows.params import CurateParams

    with pytest.raises(ValueError, match=r"now scoring\.weights\.weight_samples"):  # the Prefect form too
        CurateParams.model_validate({"scoring": {"weight_samples": 10}})
    p = CurateParams.model_validate({"scoring": {"weights": {"delta_quantile": None, "delta": 2.0},
                                                 "score": {"top_k": 3}}})
    assert (p.scoring.weights.delta_quantile, p.scoring.weights.delta, p.scoring.score.top_k) == (None, 2.0, 3)


def test_each_permanent_input_error_is_one_paragraph(model_dir, dataset, tmp_path, capsys):
    base = _base(model_dir, dataset, tmp_path)
    cfg = _config(tmp_path, **base)
    _fails(capsys, ["run", "--config", cfg, "--set", f"dataset.uri={tmp_path}/nope.parquet"],
           "dataset.uri", "nope.parquet does not exist")
    no_rejected = tmp_path / "other" / "x.parquet"
    no_rejected.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "q", "image": _png(0), "chosen": "a"}]), no_rejected)
    _fails(capsys, ["run", "--config", cfg, "--set", f"dataset.uri={no_rejected}", "--set", "dataset.format=rlaif_v"],
           "dataset.uri", "['rejected']", "dataset.format")
    _fails(capsys, ["run", "--config", cfg, "--set", f"model.model_id={tmp_path}/no-model"],
           "model.model_id", "no-model does not exist")
    _fails(capsys, ["run", "--config", cfg, "--set", "model.layer=7"],
           "model.layer", "4 decoder layers", "between 0 and 3")
    _fails(capsys, ["run", "--config", str(tmp_path / "missing.yaml")], "missing.yaml", "cannot read")
    # an already published run id is refused before any work
    run = publish.run_uri(str(tmp_path / "out"), "train", "r1")
    storage.write_json(storage.join(run, "manifest.json"), {"run_id": "r1"})
    _fails(capsys, ["run", "--config", cfg], "output.run_id", "already published", "choose a new output.run_id")
    with pytest.raises(ConfigError, match="already published"):  # --debug: the exception itself
        main(["run", "--config", cfg, "--debug"])


def test_missing_output_bucket(model_dir, dataset, tmp_path, capsys, s3_server):
    cfg = _config(tmp_path, **_base(model_dir, dataset, tmp_path))
    _fails(capsys, ["run", "--config", cfg, "--set", "output.uri=s3://no-such-bucket-14/curated",
                    "--set", f"storage.endpoint_url={s3_server.endpoint_url}"],
           "output.uri", "bucket no-such-bucket-14 does not exist")


def test_permanent_errors_are_not_retried(prefect_harness):
    from prefect import flow, task

    from tasks.common import retry_unless_permanent

    calls = {"config": 0, "transient": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_permanent)
    def failing(kind: str):
        calls[kind] += 1
        if kind == "config":
            raise ConfigError("dataset.uri", "x does not exist", "fix it")
        raise ConnectionError("endpoint went away")

    @flow
    def both():
        for kind in calls:
            with pytest.raises((ConfigError, ConnectionError)):
                failing(kind)

    both()
    assert calls == {"config": 1, "transient": 3}
    assert is_permanent(FileNotFoundError("x")) and not is_permanent(ConnectionError("x"))
