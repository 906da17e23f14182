"""Canary tasks: make the canaries after ingest, and measure every method on them after scoring.
The algorithms live in saev_core.data.canaries and saev_core.sae.evaluation."""

from __future__ import annotations

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from saev_core.data import storage
from saev_core.pipeline import score_stages, stages
from saev_core.pipeline.hashing import digest, source_hash
from saev_core.pipeline.results import Canaries
from saev_core.pipeline.specs import CanarySpec, ValidationSpec
from saev_core.refusal import Refusal
from saev_core.sae.evaluation import canary_table


@task(name="make-canaries")
def make_canaries(record_uris: list[str], work_uri: str, canaries: CanarySpec, shard_rows: int,
                  options: dict | None, ingest_key: str) -> Canaries:
    """Canary record shards and table under <work>/canaries/<hash of the ingest and settings>."""
    out = score_stages.write_canaries(record_uris, storage.join(work_uri, "canaries",
                                                          digest([ingest_key, canaries.model_dump(mode="json"), shard_rows, source_hash()])),
                                canaries.config(), shard_rows, options)
    get_run_logger().info("%d canaries %s", out.n, out.by_kind)
    return out


@task(name="measure-canaries")
def measure_canaries(out_uri: str, real: pa.Table, canary_scores: pa.Table, table_uri: str,
                     methods: list[str], keep_percents: list[int], options: dict | None) -> list[dict]:
    """Write `out_uri` (the staged run's canaries.parquet: canary id, source id, kind, every score)
    and return the canary table: one row per (method, kind). `real` and `canary_scores` hold one
    column per method of `methods` (the run's method first)."""
    import pyarrow.parquet as pq

    with storage.open_input(table_uri, options) as fh:
        info = pq.read_table(fh)
    by_id = {}
    for m in methods:
        by_id[m] = dict(zip(real.column("sample_id").to_pylist(), real.column(m).to_pylist()))
        by_id[m].update(zip(canary_scores.column("sample_id").to_pylist(), canary_scores.column(m).to_pylist()))
    rows = info.to_pylist()
    scored = [r for r in rows if r["canary_id"] in by_id[methods[0]]]
    if len(scored) != len(rows):
        raise ValueError(f"{len(rows) - len(scored)} canaries of {table_uri} have no score")
    out = {"canary_id": [r["canary_id"] for r in rows], "source_id": [r["source_id"] for r in rows],
           "kind": [r["kind"] for r in rows]}
    for name, vals in by_id.items():
        out[name] = [vals[r["canary_id"]] for r in rows]
        out[f"source_{name}"] = [vals.get(r["source_id"]) for r in rows]
    stages.write_table(pa.table(out), out_uri, options)
    table = canary_table(by_id, rows, real.column("sample_id").to_pylist(), keep_percents)
    create_table_artifact([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in table],
                          key="curate-canaries",
                          description="canaries: paired win rate P(canary < its source), AUROC vs real samples, "
                                      "recall per keep % (0.5 / 1-p = chance)")
    return table


class RankingGateFailed(Refusal):
    """The scores cannot rank this data: nothing is published. A refusal (permanent, one
    paragraph) whose evidence holds the figures, the other methods' outcome and the canary table."""

    def __init__(self, found: str, fix: str, evidence: dict | None = None):
        method = (evidence or {}).get("method")
        super().__init__("ranking-gate", f"scoring.method={method}" if method else "the ranking gate", found, fix,
                         evidence)


@task(name="gate-ranking")
def gate_ranking(scores: pa.Table, method: str, keep_percents: list[int], validation: ValidationSpec,
                 n_cross_modal: int, canary_pairs: tuple[list, list] | None, groups: list | None = None,
                 canary_rows: list[dict] | None = None, settings: dict | None = None) -> dict:
    """Fail (RankingGateFailed, before anything is published) on tie-picked subsets or too few
    cross-modal features; flag a paired win rate on image_swap canaries not clearly above 0.5.
    The refusal names the settings that would change the outcome (`settings`: the run's method
    list, pool, weight samples, SAE size; every other scored method is checked the same way)."""
    from saev_core.sae.ranking_gate import check_ranking, refusal_advice, win_rate_interval
    from saev_core.sae.scoring import SCORERS

    win = win_rate_interval(*canary_pairs) if canary_pairs and canary_pairs[0] else None
    out = check_ranking(scores.column("sample_id").to_pylist(), scores.column(method).to_pylist(), keep_percents,
                        method=method, max_tie_share=validation.max_tie_share,
                        needs_weights=SCORERS[method].needs_weights, n_cross_modal=n_cross_modal,
                        min_cross_modal=validation.min_cross_modal_features, canary_win=win,
                        min_canary_win_rate=validation.min_canary_win_rate, groups=groups)
    logger = get_run_logger()
    for flag in out["flags"]:
        logger.warning(flag)
    if out["failures"]:
        methods = [m for m in (settings or {}).get("methods", [method]) if m in SCORERS]
        columns = {m: scores.column(m).to_pylist() for m in methods if m in scores.column_names}
        found, fix, evidence = refusal_advice(
            out, method=method, sample_ids=scores.column("sample_id").to_pylist(), scores_by_method=columns,
            keep_percents=keep_percents, max_tie_share=validation.max_tie_share,
            needs_weights={m: SCORERS[m].needs_weights for m in columns}, n_cross_modal=n_cross_modal,
            min_cross_modal=validation.min_cross_modal_features, min_canary_win_rate=validation.min_canary_win_rate,
            canary_rows=canary_rows, settings=settings, groups=groups)
        raise RankingGateFailed(found, fix, evidence)
    return out


def image_swap_pairs(table_uri: str, real: pa.Table, canary_scores: pa.Table, method: str,
                     options: dict | None) -> tuple[list, list]:
    """(canary scores, source scores) of the image_swap canaries, in the run's method."""
    import pyarrow.parquet as pq

    with storage.open_input(table_uri, options) as fh:
        info = pq.read_table(fh).to_pylist()
    by_id = dict(zip(real.column("sample_id").to_pylist(), real.column(method).to_pylist()))
    by_id.update(zip(canary_scores.column("sample_id").to_pylist(), canary_scores.column(method).to_pylist()))
    pairs = [(by_id[r["canary_id"]], by_id[r["source_id"]]) for r in info if r["kind"] == "image_swap"]
    return [c for c, _ in pairs], [s for _, s in pairs]
