"""Recurring curation (issue 22) end to end under a Prefect test harness: a run that trains,
promoted to a versioned curation model; pinned runs over a folder that grows, which forward only
the new rows and keep the scores and decisions of unchanged rows; the run history, the diff of
two runs, the dataset card; and a tampered or missing curation-model file (clear error, nothing
published)."""

import contextlib
import io
import json
import shutil

import pyarrow.parquet as pq
import pytest

from flows.params import CurateParams
from saev_core.data import publish
from saev_core.pipeline import curation_model as cmodel
from tiny_mllms import build_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def toy_rows(tmp_path_factory):
    """80 toy rows (rlaif-v layout, Parquet with HF image features), to be appended in parts."""
    from saev_core.toyworld.generator import write_preference_dataset

    folder = tmp_path_factory.mktemp("toy")
    paths = write_preference_dataset(folder, 80, layout="rlaif-v", corruption_rate=0.3, seed=3)
    return pq.read_table(paths["parquet"])


def _params(model_dir, data, out, run_id, **scoring):
    return CurateParams.model_validate({
        "dataset": {"uri": str(data), "name": "growing", "shard_rows": 25},
        "model": {"model_id": model_dir, "layer": 1, "device": "cpu", "batch_size": 16},
        "sae": {"steps": 80, "batch_size": 256, "expansion_factor": 4, "lr": 1e-3},
        "scoring": {"weights": {"weight_samples": 40}, "canaries": {"min_count": 8},
                    "baselines": ["cooccur_l0", "raw_cosine"], **scoring},
        "output": {"uri": str(out), "work_uri": str(out / "_work"), "run_id": run_id, "keep_percents": [25, 50]},
        "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
    })


def _cli(*argv) -> tuple[int, str, str]:
    """The command line in this process, its output captured here (not with capsys: Prefect's
    console handler, set up during a test, would keep capsys's stream after it is closed)."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _scores(run):
    t = publish.read_scores(str(run))
    return dict(zip(t.column("sample_id").to_pylist(), t.column("score").to_pylist())), t


@pytest.mark.slow
def test_promote_pin_grow_diff(prefect_harness, model_dir, toy_rows, tmp_path):
    from flows.curate import curate

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    pq.write_table(toy_rows.slice(0, 60), data / "part-000.parquet")
    base = curate(_params(model_dir, data, out, "base"))
    base_run = out / "growing" / "base"

    # promote: a checksummed, versioned copy; a second promotion is a new version, never an overwrite
    assert _cli("promote", str(base_run), "--name", "nightly")[0] == 0
    v1 = out / "_models" / "nightly" / "v1"
    card = json.loads((v1 / "curation_model.json").read_text())
    assert card["version"] == 1 and card["source_run"] == str(base_run)
    assert set(card["files"]) == {"sae/cfg.json", "sae/sae_weights.safetensors", "weights.safetensors",
                                  "reference_canaries.parquet"}
    assert card["scoring"]["delta"] == base["weights"]["delta"]
    assert card["keep_threshold"] == {"percent": 50, "score": base["subsets"]["top-50"]["min_score"]}
    first_bytes = (v1 / "curation_model.json").read_bytes()
    from flows.recurring import promote_flow

    again = promote_flow(str(base_run), "nightly")  # the Prefect flow of the same
    assert again["version"] == 2 and (v1 / "curation_model.json").read_bytes() == first_bytes

    # pinned, same rows: nothing forwarded, every score as the promoted run scored it
    night0 = curate(_params(model_dir, data, out, "night0", curation_model="nightly@v1"))
    assert night0["incremental"] == {"forwarded": 0, "reused": 60, "total": 60, "seeded": 60,
                                     "canaries_forwarded": 0}
    # the canary table of a night with nothing new: the fixed reference set (the promoted run's canaries)
    assert night0["canaries"] and {r["n"] for r in night0["canaries"] if r["method"] == "reference"} == {2}
    stages = {s["stage"]: s["detail"] for s in night0["stages"]}
    assert "sae" not in stages and "activations" not in stages  # no SAE, no weights, no delta
    base_scores, base_t = _scores(base_run)
    night0_scores, _ = _scores(out / "growing" / "night0")
    assert night0_scores == base_scores
    m0 = publish.read_manifest(str(out / "growing" / "night0"))
    assert m0["curation_model"]["ref"] == "nightly@v1" and m0["changes"]["parent_run_id"] == "base"
    assert m0["changes"]["unchanged"] == 60  # base kept its top 50% (ties cut by id); night0 keeps score >= threshold
    assert all(r.startswith("decision rule changed") for r in m0["changes"]["by_reason"])

    # the folder grows by 20 rows: only those are forwarded, old rows keep score and decision
    pq.write_table(toy_rows.slice(60, 20), data / "part-001.parquet")
    night1 = curate(_params(model_dir, data, out, "night1", curation_model="nightly"))  # newest: v2, same files
    assert night1["incremental"]["forwarded"] == 20 and night1["incremental"]["reused"] == 60
    can1 = publish.read_manifest(str(out / "growing" / "night1"))["canaries"]
    assert can1["reference"] == 8 and can1["new"] == 1  # 5% of 20 new rows: the reference set covers min_count
    run1 = out / "growing" / "night1"
    s1, t1 = _scores(run1)
    assert len(s1) == 80 and all(s1[k] == v for k, v in base_scores.items())
    m1 = publish.read_manifest(str(run1))
    assert m1["curation_model"]["ref"] == "nightly@v2"
    ch = m1["changes"]
    assert ch["parent_run_id"] == "night0"  # the same curation model's key: v1 and v2 hold the same files
    assert (ch["added"], ch["removed"], ch["changed"], ch["unchanged"], ch["flipped"]) == (20, 0, 0, 60, 0)
    decisions = pq.read_table(run1 / "decisions.parquet").to_pylist()
    threshold = card["keep_threshold"]["score"]
    assert all(d["kept"] == (d["score"] >= threshold) for d in decisions)
    # the store keyed by content: the 20 new rows are reused by the next run wherever they sit
    pq.write_table(toy_rows.slice(60, 20), data / "part-000b.parquet")  # moved: same rows, new file order
    (data / "part-001.parquet").unlink()
    night2 = curate(_params(model_dir, data, out, "night2", curation_model="nightly"))
    assert night2["incremental"]["forwarded"] == 0 and night2["incremental"]["reused"] == 80
    assert _scores(out / "growing" / "night2")[0] == s1

    # a changed row: same position, other content -> reported as changed, its flip explained
    edited = toy_rows.slice(0, 60).to_pylist()
    edited[0]["chosen"] = edited[0]["chosen"] + " (edited)"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(edited, schema=toy_rows.schema), data / "part-000.parquet")
    night3 = curate(_params(model_dir, data, out, "night3", curation_model="nightly"))
    assert night3["incremental"]["forwarded"] == 1
    m3 = publish.read_manifest(str(out / "growing" / "night3"))
    assert m3["changes"]["changed"] == 1 and m3["changes"]["flipped_unchanged"] == 0
    changes = pq.read_table(out / "growing" / "night3" / "changes.parquet").to_pylist()
    changed = [c for c in changes if c["change"] == "changed"]
    assert len(changed) == 1 and changed[0]["sample_id_before"] != changed[0]["sample_id_after"]
    if changed[0]["flipped"]:
        assert changed[0]["reason"] == "content changed"

    # history and diff
    rc, listing, _ = _cli("runs", str(out / "growing"))
    assert rc == 0
    assert all(r in listing for r in ("base", "night0", "night1", "night2", "night3")) and "nightly@v2" in listing
    rc, diff, _ = _cli("diff", str(out / "growing" / "base"), "night1")
    assert rc == 0
    assert "20 added, 0 removed, 0 changed, 60 unchanged" in diff and "(trained) -> nightly@v2" in diff
    assert "History of this dataset" in (run1 / "report.html").read_text()

    # the dataset card: load_dataset(run_folder, "top-50")
    import datasets

    ds = datasets.load_dataset(str(run1), "top-50", split="train")
    assert ds.num_rows == m1["subsets"]["top-50"]["rows"] and "images" in ds.column_names
    assert "config_name: top-25" in (run1 / "README.md").read_text()

    # the `kept` subset of a pinned run: exactly the rows at or above the model's keep_threshold,
    # named in the card, loadable by name; it only grows while unchanged rows stay (stable decisions)
    assert "config_name: kept" in (run1 / "README.md").read_text()
    kept1 = datasets.load_dataset(str(run1), "kept", split="train")
    want = {d["sample_id"] for d in decisions if d["kept"]}
    assert 0 < kept1.num_rows == len(want) == m1["subsets"]["kept"]["rows"] == m1["decisions"]["kept"]
    assert set(kept1["sample_id"]) == want and min(kept1["score"]) >= threshold
    assert "images" in kept1.column_names and m1["subsets"]["kept"]["threshold"] == threshold
    kept0 = set(pq.read_table(out / "growing" / "night0" / "subsets" / "kept").column("sample_id").to_pylist())
    assert kept0 and kept0 <= want  # night1 added rows; night0's kept rows are all still kept
    assert "kept" not in publish.read_manifest(str(base_run))["subsets"]  # a run that trains has no threshold
    assert not (base_run / "subsets" / "kept").exists()


@pytest.mark.slow
def test_tampered_or_missing_curation_model_file(prefect_harness, model_dir, toy_rows, tmp_path):
    """A changed byte or a missing file of a pinned model: one clear error, nothing scored or published."""
    from flows.curate import curate

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    pq.write_table(toy_rows.slice(0, 40), data / "part-000.parquet")
    from flows.recurring import train_and_promote

    made = train_and_promote(_params(model_dir, data, out, "base"), name="m")  # the manual deployment's flow
    assert made["run"] == str(out / "growing" / "base") and made["promoted"]["version"] == 1
    weights = out / "_models" / "m" / "v1" / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(cmodel.CurationModelError, match=r"weights\.safetensors: has sha256 .* changed after promotion"):
        curate(_params(model_dir, data, out, "tampered", curation_model="m"))
    assert not (out / "growing" / "tampered").exists()
    weights.write_bytes(good)
    shutil.rmtree(out / "_models" / "m" / "v1" / "sae")
    with pytest.raises(cmodel.CurationModelError, match=r"sae/cfg\.json: is missing from curation model m@v1"):
        curate(_params(model_dir, data, out, "missing", curation_model="m@v1"))
    assert not (out / "growing" / "missing").exists()
    # the CLI says it in one paragraph, no traceback, before Prefect starts
    rc, _, err = _cli("run", "--set", f"dataset.uri={data}", "--set", "dataset.name=growing", "--set",
                      f"model.model_id={model_dir}", "--set", "model.layer=1", "--set", "model.device=cpu",
                      "--set", f"output.uri={out}", "--set", "scoring.curation_model=m")
    err = " ".join(err.split())
    assert rc == 2 and "is missing from curation model m@v1" in err and "Traceback" not in err
    assert "Flow run" not in err
    with pytest.raises(cmodel.CurationModelError, match="no promoted version of 'nope'"):
        cmodel.load("nope", str(out))
    assert cmodel.load("m@v1", str(out), verify=False).source_run == made["run"]
