"""Units of recurring curation without a flow: decisions and changes between runs, the run
history's chart, the dataset card, the score store keyed by content, and a curation model
promoted and verified on a real S3 server (moto)."""

import json

import pyarrow as pa
import pytest

from saev_core.data import storage
from saev_core.pipeline import curation_model as cmodel
from saev_core.pipeline import history, incremental


def _scores(rows):
    return pa.table({"sample_id": [r[0] for r in rows], "score": [r[1] for r in rows],
                     "row_index": [r[2] for r in rows]})


def test_decisions_and_changes_with_reasons():
    rule = history.decision_rule([25, 50], 0.5)
    before = history.decisions_table(_scores([("a", 0.9, 0), ("b", 0.4, 1), ("c", 0.6, 2), ("d", 0.1, 3)]),
                                     {}, rule)
    assert before.column("kept").to_pylist() == [True, False, True, False]
    # c's content changed (same row, other hash) and now scores low; d removed; e added; a unchanged
    after = history.decisions_table(_scores([("a", 0.9, 0), ("b", 0.4, 1), ("c2", 0.2, 2), ("e", 0.7, 4)]),
                                    {}, rule)
    table, summary = history.compare(before, after)
    assert (summary["added"], summary["removed"], summary["changed"], summary["unchanged"]) == (1, 1, 1, 2)
    assert summary["flipped"] == 1 and summary["flipped_unchanged"] == 0
    assert summary["by_reason"] == {"content changed": 1}
    rows = {r["row_key"]: r for r in table.to_pylist()}
    assert rows["2"]["sample_id_before"] == "c" and rows["2"]["sample_id_after"] == "c2" and rows["2"]["flipped"]
    assert rows["3"]["change"] == "removed" and rows["4"]["change"] == "added"
    assert "0" not in rows  # unchanged and not flipped: not listed

    # a relative rule: an unchanged row can drop out because other rows arrived, and it says so
    top = history.decision_rule([50], None)
    b = history.decisions_table(_scores([("a", 0.9, 0), ("b", 0.4, 1)]), {"top-50": {"a"}}, top)
    a = history.decisions_table(_scores([("a", 0.9, 0), ("b", 0.4, 1), ("x", 1.0, 2), ("y", 0.95, 3)]),
                                {"top-50": {"x", "y"}}, top)
    _, s = history.compare(b, a)
    assert s["flipped_unchanged"] == 1 and list(s["by_reason"]) == ["rank moved: the top-p% cut moved with the "
                                                                    "other rows"]
    # the same scores under another curation model's score: "score changed", naming both
    a2 = history.decisions_table(_scores([("a", 0.3, 0), ("b", 0.4, 1)]), {}, rule)
    b2 = history.decisions_table(_scores([("a", 0.9, 0), ("b", 0.4, 1)]), {}, rule)
    _, s2 = history.compare(b2, a2, {"curation_model": {"ref": "m@v1"}}, {"curation_model": {"ref": "m@v2"}})
    assert s2["by_reason"] == {"score changed: scored by m@v1, now by m@v2": 1}


def test_row_key_column_must_exist():
    from saev_core.pipeline.preflight import ConfigError

    with pytest.raises(ConfigError, match="output.row_key='idx'"):
        history.decisions_table(_scores([("a", 0.9, 0)]), {}, history.decision_rule([50], 0.5), "idx")


def test_history_chart_and_card():
    rows = [{"run_id": f"r{i}", "curation_model": "m@v1", "rows": 10, "kept_share": 0.5 + i / 10,
             "canary_win_rate": 0.6, "kept": {"top-50": 5}, "created_at": "2026", "flags": 0} for i in range(3)]
    svg = history.history_svg(rows, "r2")
    assert svg.count("<circle") == 6 and "dashed: this run" in svg
    card = history.dataset_card("r2", {"top-50": {"rows": 5, "min_score": 0.1}, "top-25": {"rows": 3,
                                                                                          "min_score": 0.2}},
                                {"scoring": {"method": "reference"}, "curation_model": {"ref": "m@v1"}})
    head = card.split("---")[1]
    assert head.index("config_name: top-25") < head.index("config_name: top-50")
    assert "path: subsets/top-50/*.parquet" in head and "curation model m@v1" in card
    assert "kept" not in head
    # a pinned run's `kept` subset: named after the top-p% ones (top-25 stays the default), explained
    card = history.dataset_card("r2", {"kept": {"rows": 4, "min_score": 0.15, "threshold": 0.12},
                                       "top-50": {"rows": 5, "min_score": 0.1}}, {"scoring": {"method": "reference"}})
    head = card.split("---")[1]
    assert head.index("config_name: top-50") < head.index("config_name: kept")
    assert "path: subsets/kept/*.parquet" in head
    assert head.index("default: true") < head.index("config_name: kept")
    assert "| kept | 4 | 0.15 |" in card and "keep threshold (0.12)" in card


def test_score_store_is_keyed_by_content(tmp_path):
    work = str(tmp_path)
    t = pa.table({"sample_id": ["a", "b"], "m": [1.0, 2.0], "n_positions": [3, 4], "n_image_positions": [1, 1],
                  "truncated_tokens": [0, 0]})
    assert incremental.append_store(work, "k", [t], ["m"]) == 2
    # a later part never overrides a stored score (first copy wins), canaries are never stored
    t2 = pa.table({"sample_id": ["b", "c", "canary-x"], "m": [9.0, 3.0, 4.0], "n_positions": [4, 5, 6],
                   "n_image_positions": [1, 1, 1], "truncated_tokens": [0, 0, 0]})
    assert incremental.append_store(work, "k", [t2], ["m"]) == 2
    got = incremental.read_store(work, "k", ["m"])
    assert dict(zip(got.column("sample_id").to_pylist(), got.column("m").to_pylist())) == {"a": 1.0, "b": 2.0,
                                                                                          "c": 3.0}
    assert incremental.read_store(work, "other", ["m"]).num_rows == 0


def _fake_run(root: str, so: dict | None) -> str:
    """A published run's manifest and the files a promotion copies (contents are opaque here)."""
    run = storage.join(root, "ds", "r1")
    sae = storage.join(root, "_work", "sae", "x")
    storage.write_bytes(storage.join(sae, "cfg.json"), b'{"d_in": 8}', so)
    storage.write_bytes(storage.join(sae, "sae_weights.safetensors"), b"weights-bytes", so)
    storage.write_bytes(storage.join(root, "_work", "weights", "w.safetensors"), b"cross-modal", so)
    import hashlib

    manifest = {"run_id": "r1", "sae": {"uri": sae, "sha256": hashlib.sha256(b"weights-bytes").hexdigest()},
                "scoring": {"method": "reference", "columns": ["reference"], "delta": 0.5, "n_cross_modal": 3,
                            "d_sae": 32, "weights_uri": storage.join(root, "_work", "weights", "w.safetensors"),
                            "top_k": 10, "null_samples": 16, "pool": "joint"},
                "parameters": {"scoring": {"seed": 7}}, "model": {"model_id": "toy", "layer": 2, "fingerprint": "f"},
                "cache": {"layer": 2}, "subsets": {"top-50": {"rows": 5, "min_score": 0.25}}}
    storage.write_json(storage.join(run, "manifest.json"), manifest, so)
    return run


def test_promote_and_verify_on_s3(s3_bucket):
    so = s3_bucket.storage_options
    root = s3_bucket.uri("hist")
    run = _fake_run(root, so)
    v1 = cmodel.promote_run(run, "nightly", storage_options=so)
    v2 = cmodel.promote_run(run, "nightly", keep_percent=50, storage_options=so)
    assert (v1.version, v2.version) == (1, 2) and v1.scoring["seed"] == 7 and v1.threshold == 0.25
    assert cmodel.versions(root, "nightly", so) == [1, 2]
    assert cmodel.load("nightly", root, so).version == 2 and cmodel.load("nightly@v1", root, so).key == v1.key
    # never overwritten: the card is written exclusively
    with pytest.raises(FileExistsError):
        storage.write_bytes(storage.join(v1.uri, cmodel.CARD_FILE), b"{}", so, overwrite=False)
    storage.write_bytes(storage.join(v2.uri, "weights.safetensors"), b"cross-modaL", so)
    with pytest.raises(cmodel.CurationModelError, match="changed after promotion"):
        cmodel.load("nightly", root, so)
    with pytest.raises(cmodel.ConfigError, match="has no top-10 subset"):
        cmodel.promote_run(run, "nightly", keep_percent=10, storage_options=so)
    assert json.loads(storage.read_bytes(storage.join(v1.uri, cmodel.CARD_FILE), so))["version"] == 1


def test_diff_of_a_run_from_before_the_nested_scoring_keys_shows_only_real_changes(tmp_path):
    """A run whose parameters hold the flat scoring keys (delta_quantile, top_k) against one with
    the nested layout: the same values are not reported as changed, a changed one is."""
    import pyarrow.parquet as pq

    scores = _scores([("a", 0.9, 0), ("b", 0.1, 1)])
    decisions = history.decisions_table(scores, {"top-50": {"a"}}, history.decision_rule([50], None))
    scoring = {"a": {"method": "reference", "delta_quantile": 0.5, "top_k": 10},
               "b": {"method": "reference", "weights": {"delta_quantile": 0.5}, "score": {"top_k": 12}}}
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        pq.write_table(decisions, run / history.DECISIONS_FILE)
        storage.write_json(str(run / "manifest.json"), {
            "run_id": name, "parameters": {"scoring": scoring[name]}, "counts": {"scored": 2},
            "subsets": {"top-50": {"rows": 1, "min_score": 0.9}}}, None)
        runs.append(str(run))
    d = history.diff_runs(*runs)
    assert d["parameters"] == {"scoring.score.top_k": (10, 12)}
