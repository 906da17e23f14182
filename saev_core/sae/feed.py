"""The SAE's training feed: which cached tokens train the SAE, and batches that keep a device busy.

- `draw_training_sample`: a seeded sample of samples (optionally of positions within them) drawn
  across the WHOLE dataset up to a token budget, from the shards' small indexes only.
- `CacheFeed`: one epoch per call, the drawn samples in a fresh seeded order, each fetched by one
  ranged read of its own rows (a few in flight on reader threads): no whole-shard copies.
- `batch_provider`: a mixing buffer sized in tokens (preallocated; served rows' slots refilled in
  place, chosen by its own seeded generator), run in a background thread so reads and mixing
  overlap the SAE step.

Why not SAELens's cached-activations path: its `ActivationsStore` reads a local `datasets` folder
of fixed-length contexts ([context_size, d_in] rows written by its own runner), while our samples
have 1-3k positions of varying length in content-addressed shards on any URI; and its
`mixing_buffer` concatenates the whole buffer for every incoming chunk and shuffles with the
global RNG, which a background thread would share with the trainer. The buffer here has the same
semantics (keep a random half, serve the rest) without either cost. Same seed => same batches, whatever
the threads' timing.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

RECIPE_TOKENS = 30_000 * 4_096  # the paper's budget: 122,880,000 tokens (SAEV_METHOD.md section 1)


@dataclass
class TrainingSample:
    """The cached samples (and positions) that train the SAE, in drawn order."""

    keys: list[str]  # shard key of each drawn sample
    starts: list[int]  # first row of the sample in its shard
    lengths: list[int]  # positions of the sample
    sample_ids: list[str]
    position_fraction: float
    seed: int

    @property
    def n_tokens(self) -> int:
        return sum(positions_kept(n, self.position_fraction) for n in self.lengths)

    def to_dict(self) -> dict:
        return asdict(self)


def positions_kept(length: int, fraction: float) -> int:
    return length if fraction >= 1 else max(1, round(length * fraction))


def _subseed(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big") >> 1


def draw_training_sample(cache, keys: Sequence[str], max_tokens: int | None = None, seed: int = 0,
                         position_fraction: float = 1.0, max_samples: int | None = None) -> TrainingSample:
    """Samples in a seeded random order over every shard in `keys`, kept until `max_tokens`
    positions or `max_samples` samples are drawn (all when None). With `position_fraction` < 1
    only that share of each sample's positions is used, so a budget spreads over more samples."""
    if not 0 < position_fraction <= 1:
        raise ValueError(f"position_fraction must be in (0, 1], got {position_fraction}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    all_keys, starts, lengths, ids = [], [], [], []
    for key in keys:
        index = cache.index(key)
        n = index.num_rows
        all_keys += [key] * n
        starts += index.column("start").to_pylist()
        lengths += index.column("length").to_pylist()
        ids += index.column("sample_id").to_pylist()
    if not ids:
        raise ValueError("no cached samples to draw the SAE's training sample from")
    # host: a seeded CPU draw, the same on every device
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, total = [], 0
    for i in order:
        if (max_tokens is not None and total >= max_tokens) or (max_samples is not None
                                                                 and len(picked) >= max_samples):
            break
        picked.append(i)
        total += positions_kept(lengths[i], position_fraction)
    return TrainingSample([all_keys[i] for i in picked], [starts[i] for i in picked],
                          [lengths[i] for i in picked], [ids[i] for i in picked], position_fraction, seed)


def _in_order(fn: Callable, items: Iterable, threads: int, ahead: int) -> Iterator:
    """fn over items on `threads` threads with up to `ahead` calls in flight, results in order."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sae-feed-read") as pool:
        it, pending = iter(items), deque()
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            done = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield done.result()


class CacheFeed:
    """A re-iterable source for `batch_provider`: every call is one epoch over the training
    sample, in a new seeded order, yielding each sample's (kept) rows in the storage dtype."""

    def __init__(self, cache, sample: TrainingSample, read_threads: int = 4, read_ahead: int = 8):
        self.cache, self.sample = cache, sample
        self.read_threads, self.read_ahead = read_threads, read_ahead
        self.epoch = 0

    def _read(self, i: int) -> torch.Tensor:
        s = self.sample
        with self.cache.open_shard(s.keys[i], checked=True) as f:  # draw_training_sample checked it
            rows = f.rows("acts", s.starts[i], s.starts[i] + s.lengths[i])
        keep = positions_kept(s.lengths[i], s.position_fraction)
        if keep < s.lengths[i]:
            g = torch.Generator().manual_seed(_subseed(s.seed, s.sample_ids[i]))
            rows = rows[torch.randperm(s.lengths[i], generator=g)[:keep].sort().values]  # host: CPU generator
        return rows

    def __call__(self) -> Iterator[torch.Tensor]:
        n = len(self.sample.keys)
        g = torch.Generator().manual_seed(_subseed(self.sample.seed, f"epoch {self.epoch}"))
        self.epoch += 1
        # host: CPU generator
        return _in_order(self._read, torch.randperm(n, generator=g).tolist(), self.read_threads, self.read_ahead)


def _mixed_batches(source: Callable[[], Iterable[torch.Tensor]], batch_size: int, buffer_tokens: int,
                   seed: int, pin: bool = False) -> Iterator[torch.Tensor]:
    """float32 [batch_size, d] batches from a buffer of `buffer_tokens` rows, filled in place:
    when full it serves a random half of its rows and refills exactly those slots, so no row is
    ever moved; an epoch's end serves all but a remainder, so every token comes out once an epoch."""
    gen = torch.Generator().manual_seed(seed)
    cap = max(buffer_tokens, 2 * batch_size)
    buf: torch.Tensor | None = None
    # host: slot bookkeeping of the host buffer
    free, held = torch.arange(cap), torch.empty(0, dtype=torch.long)  # slot numbers

    def serve(keep: int) -> Iterator[torch.Tensor]:
        nonlocal free, held
        perm = held[torch.randperm(held.numel(), generator=gen)]  # host: CPU generator, same order on every device
        n_out = (held.numel() - keep) // batch_size * batch_size
        for start in range(0, n_out, batch_size):
            # pinned memory comes from torch's caching host allocator: reused, no page faults
            # host: pinned staging batch, copied to the device
            out = torch.empty((batch_size, buf.shape[1]), pin_memory=pin)
            rows = perm[start:start + batch_size]
            if buf.dtype == torch.float32:
                torch.index_select(buf, 0, rows, out=out)
            else:
                out.copy_(buf.index_select(0, rows))
            yield out
        free, held = torch.cat([free, perm[:n_out]]), perm[n_out:]

    while True:
        seen = 0
        for chunk in source():
            chunk = chunk.reshape(-1, chunk.shape[-1])
            if buf is None:
                # host: the shuffle buffer lives in host memory
                buf = torch.empty(cap, chunk.shape[1], dtype=chunk.dtype)
            seen += chunk.shape[0]
            pos = 0
            while pos < chunk.shape[0]:
                take = min(free.numel(), chunk.shape[0] - pos)
                buf.index_copy_(0, free[:take], chunk[pos:pos + take].to(buf.dtype))
                held, free, pos = torch.cat([held, free[:take]]), free[take:], pos + take
                if free.numel() == 0:
                    yield from serve(cap // 2)
        if seen == 0:
            raise ValueError("the activation source is empty: nothing to train the SAE on")
        yield from serve(0)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _in_background(make: Callable[[], Iterator], depth: int) -> Iterator:
    """Run an iterator in a daemon thread, `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in make():
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))

    thread = threading.Thread(target=run, daemon=True, name="sae-feed")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)  # its reader threads finish too: none is left running at exit


def batch_provider(source: Callable[[], Iterable[torch.Tensor]], batch_size: int, buffer_tokens: int = 131_072,
                   seed: int = 0, device: str = "cpu", prefetch: int = 4) -> Iterator[torch.Tensor]:
    """Endless iterator of float32 [batch_size, d_in] batches on `device` from chunks of any size.

    `source()` returns a fresh pass over the activations (called again at each epoch's end).
    A buffer of `buffer_tokens` positions (>= 2 batches) mixes image and text positions of many
    samples in every step, as in the paper's training buffer. With `prefetch` > 0 the reading
    and mixing run in a background thread, that many batches ahead of the SAE step.
    """
    def make() -> Iterator[torch.Tensor]:
        yield from _mixed_batches(source, batch_size, buffer_tokens, seed, pin=str(device).startswith("cuda"))

    batches = _in_background(make, prefetch) if prefetch > 0 else make()
    try:
        for batch in batches:
            yield batch.to(device, non_blocking=True)
    finally:
        batches.close()
