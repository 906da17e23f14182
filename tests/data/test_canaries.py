"""Canaries made from the user's own records, and the metrics computed on them, by hand."""

import io
import json
import math

import pytest
from PIL import Image

from saev_core.data.canaries import (CANARY_PREFIX, KINDS, CanaryConfig, canary_count, is_canary_id,
                                     make_canaries)
from saev_core.data.records import RECORD_SCHEMA, CanonicalRecord, records_to_table
from saev_core.sae.evaluation import canary_auroc, canary_recall, canary_table, paired_win_rate


def _png(grey: int, box: tuple[int, int, int, int] | None = None) -> bytes:
    im = Image.new("RGB", (16, 16), (grey, grey, grey))
    if box:
        im.paste((255, 255, 255), box)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _records() -> list[CanonicalRecord]:
    # images: 0 and 1 nearly alike (dark, small box in the same place), 2 bright, 3 mid grey
    imgs = [_png(10, (0, 0, 4, 4)), _png(12, (0, 0, 4, 4)), _png(240), _png(128)]
    prompts = ["what color is the circle?", "how many objects?", "what color is the circle?", "where is it?"]
    return [CanonicalRecord.build(i, p, im, f"answer {i}", f"wrong {i}") for i, (p, im) in
            enumerate(zip(prompts, imgs))]


def _shards(records, size=2):
    tables = [records_to_table(records[i:i + size]) for i in range(0, len(records), size)]
    return (lambda s: tables[s]), len(tables)


def test_count_rules():
    assert canary_count(10_000, CanaryConfig()) == 500  # 5%
    assert canary_count(1_000, CanaryConfig()) == 200  # at least 200
    assert canary_count(150, CanaryConfig()) == 150  # the data does not allow 200
    assert canary_count(100_000, CanaryConfig(cap=2000)) == 2000
    assert canary_count(1_000, CanaryConfig(enabled=False)) == 0
    with pytest.raises(ValueError, match="canary kinds"):
        CanaryConfig(kinds=("image_swap", "bogus"))


def test_each_kind_breaks_its_source_as_specified():
    records = _records()
    by_id = {r.sample_id: r for r in records}
    read, n = _shards(records)
    for kind in KINDS:
        table, info = make_canaries(read, n, CanaryConfig(kinds=(kind,), min_count=4, seed=3))
        assert table.schema.equals(RECORD_SCHEMA, check_metadata=False)
        assert info.num_rows == table.num_rows == 4  # every record is a source once
        assert sorted(info.column("source_id").to_pylist()) == sorted(by_id)
        for rec, row in zip(table.to_pylist(), info.to_pylist()):
            src = by_id[row["source_id"]]
            assert is_canary_id(rec["sample_id"]) and rec["sample_id"] == row["canary_id"]
            assert rec["sample_id"] not in by_id and rec["row_index"] < 0
            assert json.loads(rec["extra"])["_saev_canary"]["kind"] == kind
            assert rec["prompt"] == src.prompt
            if kind == "flipped":
                assert (rec["chosen"], rec["rejected"], rec["image"]) == (src.rejected, src.chosen, src.image)
                continue
            donor = by_id[row["donor_id"]]
            assert donor.sample_id != src.sample_id
            if kind.startswith("image_swap"):
                assert rec["image"] == donor.image != src.image
                assert (rec["chosen"], rec["rejected"]) == (src.chosen, src.rejected)
            else:
                assert rec["chosen"] == donor.chosen != src.chosen and rec["rejected"] == src.rejected
                assert rec["image"] == src.image
    # the near swap takes the look-alike image: record 0 <-> record 1
    table, info = make_canaries(read, n, CanaryConfig(kinds=("image_swap_near",), min_count=4))
    donor_of = dict(zip(info.column("source_id").to_pylist(), info.column("donor_id").to_pylist()))
    assert donor_of[records[0].sample_id] == records[1].sample_id
    assert donor_of[records[1].sample_id] == records[0].sample_id
    # the response swap takes the answer of the sample with the same prompt: record 0 <-> record 2
    table, info = make_canaries(read, n, CanaryConfig(kinds=("response_swap",), min_count=4))
    donor_of = dict(zip(info.column("source_id").to_pylist(), info.column("donor_id").to_pylist()))
    assert donor_of[records[0].sample_id] == records[2].sample_id
    assert donor_of[records[2].sample_id] == records[0].sample_id


def test_seeded_and_kinds_in_turn():
    records = _records()
    read, n = _shards(records)
    a = make_canaries(read, n, CanaryConfig(min_count=4, seed=1))[1].to_pylist()
    b = make_canaries(read, n, CanaryConfig(min_count=4, seed=1))[1].to_pylist()
    assert a == b and sorted(r["kind"] for r in a) == sorted(KINDS)
    assert make_canaries(read, n, CanaryConfig(enabled=False))[0].num_rows == 0


def test_no_donor_with_the_same_image_or_answer():
    img = _png(50)
    recs = [CanonicalRecord.build(i, "q?", img, f"a{i}", f"b{i}") for i in range(3)]
    read, n = _shards(recs)
    table, _ = make_canaries(read, n, CanaryConfig(kinds=("image_swap", "image_swap_near"), min_count=3))
    assert table.num_rows == 0  # every other image is the same picture: nothing to swap in
    same = [CanonicalRecord.build(i, "q?", _png(10 * i), "same", f"b{i}") for i in range(3)]
    read, n = _shards(same)
    table, _ = make_canaries(read, n, CanaryConfig(kinds=("response_swap",), min_count=3))
    assert table.num_rows == 0  # every donor's chosen equals the source's


def test_paired_win_rate_by_hand():
    # canary < source, tie, canary > source, canary < source -> (1 + 0.5 + 0 + 1) / 4
    assert paired_win_rate([0.1, 0.5, 0.9, 0.2], [0.3, 0.5, 0.4, 0.8]) == pytest.approx(0.625)
    assert math.isnan(paired_win_rate([], []))
    with pytest.raises(ValueError, match="2 canary scores but 1"):
        paired_win_rate([1, 2], [1])


def test_canary_auroc_and_recall_by_hand():
    real = [0.9, 0.8, 0.5, 0.4]
    canary = [0.45, 0.8]
    # pairs (canary below real): 0.45 < 0.9, 0.8, 0.5 (3); 0.8 < 0.9 (1), tie with 0.8 (0.5) -> 4.5 / 8
    assert canary_auroc(canary, real) == pytest.approx(4.5 / 8)
    rec = canary_recall(canary, real, [25, 50, 100])
    # top 25% = {0.9}: both excluded; top 50% = {0.9, 0.8}: 0.45 excluded, 0.8 ties -> 1.5/2;
    # top 100%: threshold 0.4, nothing excluded
    assert rec == {25: 1.0, 50: pytest.approx(0.75), 100: 0.0}


def test_canary_table_rows():
    scores = {"m": {"r1": 1.0, "r2": 2.0, "c1": 0.5, "c2": 3.0}}
    canaries = [{"canary_id": "c1", "source_id": "r1", "kind": "flipped"},
                {"canary_id": "c2", "source_id": "r2", "kind": "image_swap"}]
    rows = canary_table(scores, canaries, ["r1", "r2"], [50])
    assert [(r["kind"], r["paired_win_rate"], r["auroc"], r["recall_top50"]) for r in rows] == [
        ("flipped", 1.0, 1.0, 1.0), ("image_swap", 0.0, 0.0, 0.0)]
    with pytest.raises(ValueError, match="no score for 1"):
        canary_table({"m": {"r1": 1.0, "r2": 2.0, "c1": 0.5}}, canaries, ["r1", "r2"])



def test_tie_picked_by_hand():
    from saev_core.sae.ranking_gate import tie_picked

    ids = list("abcdefgh")
    scores = [5, 4, 0, 0, 0, 0, 0, 0]
    # top 50% = 4 rows: 5, 4 and two of the six zeros, chosen by id order -> 2 tie-picked rows
    assert tie_picked(ids, scores, 50) == {"rows": 2, "subset": 4, "threshold": 0.0, "tie_size": 6, "share": 0.5}
    # top 25% = {5, 4}: the threshold 4 is a tie of one, wholly inside -> nothing picked by order
    assert tie_picked(ids, scores, 25)["rows"] == 0
    # a tie that ends exactly at the cut picks nothing either
    assert tie_picked(list("abcd"), [1, 1, 0, 0], 50)["rows"] == 0


def test_check_ranking_fails_and_flags():
    from saev_core.sae.ranking_gate import check_ranking, win_rate_interval

    ids = list("abcdefgh")
    scores = [5, 4, 0, 0, 0, 0, 0, 0]
    out = check_ranking(ids, scores, [25, 50], method="reference", max_tie_share=0.2)
    assert len(out["failures"]) == 1 and "top-50: 2 of its 4 rows (50.0%)" in out["failures"][0]
    assert check_ranking(ids, scores, [25, 50], method="m", max_tie_share=0.5)["failures"] == []
    out = check_ranking(ids, list(range(8)), [50], method="reference", max_tie_share=0.0, needs_weights=True,
                        n_cross_modal=3, min_cross_modal=10)
    assert out["failures"] == [out["failures"][0]] and "only 3 cross-modal features" in out["failures"][0]
    # win rate: outcomes 1, 1, 1, 0.5 -> mean 0.875, sd 0.25, half-width 1.96 * 0.25 / 2 = 0.245
    rate, lo, hi = win_rate_interval([0, 0, 0, 1], [1, 1, 1, 1])
    assert (rate, lo, hi) == (pytest.approx(0.875), pytest.approx(0.63), pytest.approx(1.12))
    ok = check_ranking(ids, list(range(8)), [50], method="m", max_tie_share=0, canary_win=(rate, lo, hi))
    assert ok["flags"] == [] and ok["canary_image_swap"]["clearly_above_chance"]
    weak = check_ranking(ids, list(range(8)), [50], method="m", max_tie_share=0, canary_win=(0.55, 0.45, 0.65),
                         min_canary_win_rate=0.6)
    assert "not clearly above 0.5" in weak["flags"][0] and "min_canary_win_rate = 0.6" in weak["failures"][0]


def test_write_canaries_even_shards_and_reuse(tmp_path):
    from saev_core.pipeline.stages import write_table
    from saev_core.pipeline.score_stages import write_canaries

    recs = [CanonicalRecord.build(i, f"q {i % 3}?", _png(20 * i), f"a{i}", f"b{i}") for i in range(9)]
    uris = [write_table(records_to_table(recs[i:i + 4]), str(tmp_path / f"r{i}.parquet")) for i in range(0, 9, 4)]
    out = write_canaries(uris, str(tmp_path / "can"), CanaryConfig(min_count=7), shard_rows=4)
    assert out.n == 7 and sum(out.by_kind.values()) == 7
    import pyarrow.parquet as pq

    sizes = [pq.read_table(u).num_rows for u in out.record_uris]
    assert sizes == [3, 4]  # 7 rows in two shards of even size
    ids = {r.sample_id for r in recs}
    for u in out.record_uris:
        assert not set(pq.read_table(u).column("sample_id").to_pylist()) & ids
    stamp = (tmp_path / "can" / "canaries.parquet").stat().st_mtime_ns
    assert write_canaries(uris, str(tmp_path / "can"), CanaryConfig(min_count=7), shard_rows=4) == out
    assert (tmp_path / "can" / "canaries.parquet").stat().st_mtime_ns == stamp


def test_ties_counted_within_groups():
    from saev_core.sae.ranking_gate import check_ranking

    ids = list("abcdef")
    scores = [3, 1, 1, 2, 0, 0]
    groups = ["x", "x", "x", "y", "y", "y"]
    # stratified top 67%: 2 of each group; x keeps 3 and one of the two 1s (1 tie-picked row),
    # y keeps 2 and one of the two 0s (1 tie-picked row) -> 2 of 4
    out = check_ranking(ids, scores, [67], method="m", max_tie_share=0.4, groups=groups)
    assert out["ties"]["67"]["rows"] == 2 and out["ties"]["67"]["subset"] == 4 and out["failures"]


def test_non_finite_scores_are_left_to_the_scores_gate():
    from saev_core.sae.ranking_gate import check_ranking

    out = check_ranking(list("abc"), [1.0, float("nan"), 0.0], [50], method="m", max_tie_share=0.0)
    assert out["failures"] == [] and "not finite" in out["flags"][0]
