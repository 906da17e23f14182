"""Canaries: known-bad copies of the user's own records, scored beside them so that every run
measures whether its ranking separates good samples from bad ones on *this* data.

Each canary copies one kept record (its *source*) and breaks it one way:

    image_swap        the image of a random other sample
    image_swap_near   the image of the most similar other sample (8x8 grey thumbnails, L2),
                      so the swap is not trivially easy
    response_swap     `chosen` taken from another sample with the same prompt, or the most
                      similar one (cosine of word counts)
    flipped           chosen and rejected exchanged

A score that reads only the prompt and the image (the authors' setting, and this project's
`reference`, `paper`, `weighted`, `coverage`, `null_z`) cannot see `response_swap` or `flipped`
by construction: those change only the responses. Their rows in the canary table are a control
(expected 0.5), not a failure of the score.

Donors never share the source's image bytes (a swap to the same picture breaks nothing), and a
response donor's `chosen` differs from both of the source's responses. Canary ids are
"canary-" + the content hash of the broken record, so they never collide with a real sample_id.
Memory: one pass over the shards keeps 64 floats per record (the thumbnail), the prompts and a
hash of each `chosen`; a second pass fetches only the sources' and donors' rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from saev_core.data.records import RECORD_SCHEMA, compute_sample_id

KINDS: tuple[str, ...] = ("image_swap", "image_swap_near", "response_swap", "flipped")
PROMPT_ONLY_BLIND: tuple[str, ...] = ("response_swap", "flipped")  # change only the responses
CANARY_PREFIX = "canary-"
CANARY_TABLE_SCHEMA = pa.schema([
    pa.field("canary_id", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("donor_id", pa.string(), nullable=True),
    pa.field("kind", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class CanaryConfig:
    """How many canaries: `fraction` of the kept records, at least `min_count` when there are
    that many records, at most `cap`; spread evenly over `kinds`, one canary per source."""

    enabled: bool = True
    fraction: float = 0.05
    min_count: int = 200
    cap: int = 2000
    kinds: tuple[str, ...] = KINDS
    seed: int = 0

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"canary kinds {list(self.kinds)}: choose from {', '.join(KINDS)}")
        if not 0 <= self.fraction <= 1 or self.min_count < 0 or self.cap < 0:
            raise ValueError(f"canary fraction {self.fraction} must be in [0, 1], min_count {self.min_count} "
                             f"and cap {self.cap} >= 0")


def canary_count(n_records: int, cfg: CanaryConfig) -> int:
    if not cfg.enabled:
        return 0
    return min(n_records, cfg.cap, max(cfg.min_count, round(cfg.fraction * n_records)))


def thumbnail(image: bytes, size: int = 8) -> np.ndarray:
    """Grey size x size thumbnail in [0, 1], flattened: a cheap image similarity."""
    with Image.open(io.BytesIO(image)) as im:
        small = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


_WORD = re.compile(r"\w+")


def _prompt_key(prompt: str) -> str:
    return " ".join(_WORD.findall(prompt.lower()))


def _word_vectors(prompts: Sequence[str], n_buckets: int = 1 << 16):
    """Rows = prompts, hashed word counts, L2-normalised (scipy sparse)."""
    from scipy import sparse

    rows, cols = [], []
    for i, p in enumerate(prompts):
        for w in _WORD.findall(p.lower()):
            rows.append(i)
            cols.append(int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big") % n_buckets)
    m = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(prompts), n_buckets))
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sparse.diags(1 / np.maximum(norms, 1e-12)) @ m


@dataclass
class CanaryIndex:
    """What donor search needs from every record, gathered shard by shard."""

    sample_ids: list[str] = field(default_factory=list)
    locations: list[tuple[int, int]] = field(default_factory=list)  # (shard, row)
    thumbs: list[np.ndarray] = field(default_factory=list)
    image_hashes: list[bytes] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    chosen_hashes: list[bytes] = field(default_factory=list)
    rejected_hashes: list[bytes] = field(default_factory=list)

    def add_shard(self, shard: int, table: pa.Table) -> None:
        ids = table.column("sample_id").to_pylist()
        for row, (sid, img, prompt, chosen, rejected) in enumerate(zip(
                ids, table.column("image").to_pylist(), table.column("prompt").to_pylist(),
                table.column("chosen").to_pylist(), table.column("rejected").to_pylist())):
            self.sample_ids.append(sid)
            self.locations.append((shard, row))
            self.thumbs.append(thumbnail(img))
            self.image_hashes.append(hashlib.sha256(img).digest())
            self.prompts.append(prompt)
            self.chosen_hashes.append(hashlib.sha256(chosen.encode()).digest())
            self.rejected_hashes.append(hashlib.sha256(rejected.encode()).digest())

    def __len__(self) -> int:
        return len(self.sample_ids)


def _u64(hashes: Sequence[bytes]) -> np.ndarray:
    return np.array([int.from_bytes(h[:8], "big") for h in hashes], dtype=np.uint64)


def plan_canaries(index: CanaryIndex, cfg: CanaryConfig) -> list[tuple[str, int, int | None]]:
    """(kind, source position, donor position or None) for each canary: seeded sources without
    replacement, kinds assigned in turn. A source without a usable donor is skipped."""
    n = len(index)
    count = canary_count(n, cfg)
    if count == 0 or n < 2:
        return []
    rng = np.random.default_rng(cfg.seed)
    sources = rng.choice(n, size=count, replace=False)
    img_h = _u64(index.image_hashes)
    thumbs = np.stack(index.thumbs) if any(k == "image_swap_near" for k in cfg.kinds) else None
    words = _word_vectors(index.prompts) if "response_swap" in cfg.kinds else None
    keys: dict[str, int] = {}
    prompt_key = np.array([keys.setdefault(_prompt_key(p), len(keys)) for p in index.prompts])
    chosen_h, rejected_h = _u64(index.chosen_hashes), _u64(index.rejected_hashes)
    plan = []
    for i, src in enumerate(sources.tolist()):
        kind = cfg.kinds[i % len(cfg.kinds)]
        other_image = img_h != img_h[src]
        if kind == "flipped":
            plan.append((kind, src, None))
            continue
        if kind == "image_swap":
            cand = np.flatnonzero(other_image)
            donor = int(rng.choice(cand)) if cand.size else None
        elif kind == "image_swap_near":
            dist = ((thumbs - thumbs[src]) ** 2).sum(1)
            dist[~other_image] = np.inf
            donor = int(np.argmin(dist)) if np.isfinite(dist).any() else None
        else:  # response_swap: same prompt first, then the most similar prompt
            usable = (chosen_h != chosen_h[src]) & (chosen_h != rejected_h[src])
            usable[src] = False
            sim = np.asarray((words @ words[src].T).todense()).ravel()
            same = prompt_key == prompt_key[src]
            rank = np.where(usable, sim + 2.0 * same, -np.inf)  # an exact prompt match beats any cosine
            donor = int(np.argmax(rank)) if np.isfinite(rank).any() else None
        if donor is not None:
            plan.append((kind, src, donor))
    return plan


def make_canaries(read_shard: Callable[[int], pa.Table], n_shards: int,
                  cfg: CanaryConfig = CanaryConfig()) -> tuple[pa.Table, pa.Table]:
    """Canary records (RECORD_SCHEMA, negative row_index) and the canary table (canary_id,
    source_id, donor_id, kind), from the kept canonical record shards read by `read_shard(i)`."""
    index = CanaryIndex()
    for s in range(n_shards):
        index.add_shard(s, read_shard(s))
    plan = plan_canaries(index, cfg)
    needed: dict[int, set[int]] = {}
    for _, src, donor in plan:
        for pos in (src, donor):
            if pos is not None:
                shard, row = index.locations[pos]
                needed.setdefault(shard, set()).add(row)
    rows: dict[tuple[int, int], dict] = {}
    for shard, want in sorted(needed.items()):
        table = read_shard(shard)
        for row in sorted(want):
            rows[(shard, row)] = table.slice(row, 1).to_pylist()[0]
    records, canaries, seen = [], [], set()
    for kind, src, donor in plan:
        s = rows[index.locations[src]]
        d = rows[index.locations[donor]] if donor is not None else None
        image, prompt, chosen, rejected = s["image"], s["prompt"], s["chosen"], s["rejected"]
        if kind in ("image_swap", "image_swap_near"):
            image = d["image"]
        elif kind == "response_swap":
            chosen = d["chosen"]
        else:
            chosen, rejected = rejected, chosen
        cid = CANARY_PREFIX + compute_sample_id(image, prompt, chosen, rejected)
        if cid in seen:
            continue
        seen.add(cid)
        donor_id = d["sample_id"] if d is not None else None
        extra = {"_saev_canary": {"kind": kind, "source_id": s["sample_id"], "donor_id": donor_id}}
        records.append({"sample_id": cid, "row_index": -1 - len(records), "prompt": prompt, "image": image,
                        "chosen": chosen, "rejected": rejected, "extra": json.dumps(extra)})
        canaries.append({"canary_id": cid, "source_id": s["sample_id"], "donor_id": donor_id, "kind": kind})
    return (pa.Table.from_pylist(records, schema=RECORD_SCHEMA),
            pa.Table.from_pylist(canaries, schema=CANARY_TABLE_SCHEMA))


def is_canary_id(sample_id: str) -> bool:
    return sample_id.startswith(CANARY_PREFIX)
