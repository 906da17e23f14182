"""Hostile input: one defect per row, every row ends kept or quarantined with its reason, nothing
outside the dataset is opened, pixels reach the model faithfully, one long row stays in budget."""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data import image_resolver, ingest, storage
from saev_core.data.images import normalize_image
from saev_core.data.ingest import IngestStream
from saev_core.data.records import REASONS, Reason, decode_extra

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def grey16() -> bytes:
    """A 16-bit greyscale gradient 0..65535: its 8-bit mean must be ~127, not ~255."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    return encode(Image.fromarray(ramp))


def transparent() -> bytes:
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red under full transparency: must come out white
    a[:4, :, 3] = 255  # top half opaque red
    return encode(Image.fromarray(a))


def palette() -> bytes:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(im)


def rotated_jpeg() -> bytes:
    """A 16x8 picture stored with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    im = Image.new("RGB", (16, 8), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", exif=exif.tobytes())


def animated() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (255, 255, 0), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def row(i: int, image, **kw) -> dict:
    return {"question": kw.pop("question", f"what is in picture {i} ?"), "image": image,
            "chosen": kw.pop("chosen", f"good {i}"), "rejected": kw.pop("rejected", f"bad {i}"),
            "ds_name": "hostile", "idx": i, **kw}


@pytest.fixture
def hostile(tmp_path):
    """A JSON-lines dataset with one defect per row; returns (path, expected outcome per row)."""
    data = tmp_path / "ds"
    (data / "img").mkdir(parents=True)
    files = {"ok.png": encode(rgb(0)), "grey16.png": grey16(), "alpha.png": transparent(), "pal.png": palette(),
             "exif.jpg": rotated_jpeg(), "anim.gif": animated(), "garbage.png": b"\x89PNG\r\n\x1a\nnot really",
             "huge.png": encode(Image.new("L", (3000, 3000))),  # 9 Mpx of zeros: small file, too many pixels
             "heavy.png": encode(rgb(1, 200))}  # ~120 kB of noise: above the byte limit below
    for name, data_ in files.items():
        (data / "img" / name).write_bytes(data_)
    secret = tmp_path / "secret.png"  # outside the dataset folder
    secret.write_bytes(encode(rgb(2)))
    os.symlink(secret, data / "img" / "link.png")
    rows = [
        (row(0, "img/ok.png"), None),
        (row(1, "https://example.invalid/cat.png"), Reason.REMOTE_IMAGE_NOT_ALLOWED),
        (row(2, {"bytes": None, "path": "s3://other-bucket/cat.png"}), Reason.REMOTE_IMAGE_NOT_ALLOWED),
        (row(3, "../../../../../../etc/passwd"), Reason.UNSAFE_IMAGE_PATH),
        (row(4, str(secret)), Reason.UNSAFE_IMAGE_PATH),
        (row(5, "img/link.png"), Reason.UNSAFE_IMAGE_PATH),  # a symlink leading out
        (row(6, "img/nope.png"), Reason.IMAGE_NOT_FOUND),
        (row(7, "img/huge.png"), Reason.IMAGE_TOO_LARGE),
        (row(8, "img/heavy.png"), Reason.IMAGE_TOO_LARGE),
        (row(9, "img/garbage.png"), Reason.IMAGE_DECODE_ERROR),
        (row(10, "img/ok.png", chosen=["good", "answer"]), Reason.INVALID_TYPE),  # never joined into a string
        (row(11, "img/ok.png", question=12345), Reason.INVALID_TYPE),
        (row(12, 42), Reason.INVALID_TYPE),
        (row(13, "img/ok.png", question="what " * 10_000), Reason.TEXT_TOO_LONG),
        (row(14, "img/grey16.png"), None),
        (row(15, "img/alpha.png"), None),
        (row(16, "img/pal.png"), None),
        (row(17, "img/exif.jpg"), None),
        (row(18, "img/anim.gif"), None),
        (row(19, None), Reason.MISSING_IMAGE),
        (row(20, "img/ok.png", chosen="same", rejected="same"), Reason.IDENTICAL_RESPONSES),
    ]
    path = data / "train.jsonl"
    with open(path, "w") as fh:
        for r, _ in rows:
            fh.write(json.dumps(r) + "\n")
        fh.write("{this is not json\n")
    expected = {i: reason for i, (_, reason) in enumerate(rows)}
    expected[len(rows)] = Reason.MALFORMED_ROW
    return str(path), expected


POLICY = {"max_image_bytes": 50_000, "max_image_pixels": 4_000_000}


class OpenSpy:
    """Records every path opened through Python and every name looked up on the network."""

    def __init__(self, monkeypatch):
        self.opened: list[str] = []
        self.lookups: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def spy_open(file, *a, **k):
            self.opened.append(str(file))
            return real_open(file, *a, **k)

        def spy_os_open(path, *a, **k):
            self.opened.append(str(path))
            return real_os_open(path, *a, **k)

        def no_network(host, *a, **k):
            self.lookups.append(str(host))
            raise OSError("network disabled in this test")

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        monkeypatch.setattr(socket, "getaddrinfo", no_network)
        monkeypatch.setattr(socket, "create_connection", no_network)


def test_every_defect_ends_kept_or_quarantined_and_nothing_outside_is_read(hostile, monkeypatch, tmp_path):
    path, expected = hostile
    spy = OpenSpy(monkeypatch)
    stream = IngestStream(path, "rlaif_v", batch_rows=4, image_policy=POLICY, max_text_chars=20_000)
    batches = list(stream)
    monkeypatch.undo()

    kept = [r for b in batches for r in b.records.to_pylist()]
    quarantined = [q for b in batches for q in b.quarantine.to_pylist()]
    got = {r["row_index"]: None for r in kept} | {q["row_index"]: q["reason"] for q in quarantined}
    assert got == expected  # each row exactly once, with its reason
    assert stream.stats.rows_in == len(expected) == len(kept) + len(quarantined)
    assert set(got.values()) - {None} <= set(REASONS)
    details = {q["row_index"]: q["detail"] for q in quarantined}
    assert "allow_remote_images" in details[1] and "outside the dataset folder" in details[3]
    # nothing outside the dataset folder was opened, and no host was looked up
    assert not [p for p in spy.opened if "passwd" in p or "secret.png" in p or "example.invalid" in p]
    assert spy.lookups == []
    assert any(p.endswith("ok.png") for p in spy.opened)  # the spy does see the opens that happen
    # the animated GIF is kept with a note; the source's own columns travel in extra
    by_row = {r["row_index"]: decode_extra(r["extra"]) for r in kept}
    assert by_row[18]["_saev_image_frames"] == "animated image: first of 3 frames used"
    assert by_row[14]["_saev_image_depth"].endswith("rescaled to 8 bits")
    assert by_row[0]["ds_name"] == "hostile" and by_row[0]["idx"] == 0


def test_counts_conserved_on_storage_and_one_failing_row_does_not_stop_the_run(hostile, monkeypatch, tmp_path):
    path, expected = hostile
    real = image_resolver.inspect_image

    def explode_on_gif(data, **kw):  # an unforeseen error inside one row
        if data[:3] == b"GIF":
            raise RuntimeError("decoder crashed")
        return real(data, **kw)

    monkeypatch.setattr(image_resolver, "inspect_image", explode_on_gif)
    out = str(tmp_path / "work")
    summary = ingest.ingest_to_storage(path, out, "rlaif_v", shard_rows=3, image_policy=POLICY,
                                       max_text_chars=20_000)
    q = pq.read_table(os.path.join(out, "quarantine.parquet")).to_pylist()
    kept = sum(ingest.read_record_shard(u).num_rows for u in ingest.list_record_shards(out))
    assert summary["rows_in"] == len(expected) == kept + len(q) == summary["kept"] + summary["quarantined"]
    errors = [r for r in q if r["reason"] == Reason.ROW_ERROR]
    assert [r["row_index"] for r in errors] == [18] and "decoder crashed" in errors[0]["detail"]


def test_remote_images_only_with_the_option(tmp_path, monkeypatch):
    """allow_remote_images hands the URL to fsspec; without it nothing is asked of fsspec."""
    data = tmp_path / "ds"
    data.mkdir()
    (data / "t.jsonl").write_text(json.dumps(row(0, "memory://bucket/cat.png")) + "\n")
    storage.write_bytes("memory://bucket/cat.png", encode(rgb(3)))
    asked = []
    real = storage.get_fs
    monkeypatch.setattr(storage, "get_fs", lambda uri, *a, **k: (asked.append(uri), real(uri, *a, **k))[1])
    records, _ = _ingest(str(data / "t.jsonl"))
    assert records == [] and "memory://bucket/cat.png" not in asked
    records, _ = _ingest(str(data / "t.jsonl"), image_policy={"allow_remote_images": True})
    assert len(records) == 1 and records[0]["image"] == encode(rgb(3))


def _ingest(path, **kw):
    batches = list(IngestStream(path, "rlaif_v", **kw))
    return [r for b in batches for r in b.records.to_pylist()], [q for b in batches for q in b.quarantine.to_pylist()]


def test_pixels_are_faithful():
    g = np.asarray(normalize_image(grey16()))
    assert g.shape == (16, 64, 3) and abs(g.mean() - 127.5) < 1 and g[0, 0, 0] == 0 and g[0, -1, 0] == 255
    a = np.asarray(normalize_image(transparent()))
    assert (a[:4] == [200, 0, 0]).all() and (a[4:] == 255).all()  # transparent part on white, not red/black
    assert (np.asarray(normalize_image(palette())) == [10, 200, 30]).all()
    assert normalize_image(rotated_jpeg()).size == (8, 16)  # EXIF orientation applied
    first = np.asarray(normalize_image(animated()))
    assert (abs(first.astype(int) - [0, 0, 255]) < 8).all()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from saev_core.model.mllm import MLLMAdapter
    from tiny_mllms import build_llava

    return MLLMAdapter.from_pretrained(str(build_llava(tmp_path_factory.mktemp("m"))), layer=1, device="cpu")


def test_the_model_sees_the_normalised_pixels(adapter):
    """The adapter's input for a 16-bit or transparent image is that of its normalised picture."""
    import torch

    for data, naive_differs in ((grey16(), True), (transparent(), True), (palette(), False)):
        raw = Image.open(io.BytesIO(data))
        ours = adapter.build_inputs([raw], ["describe the image ."])["pixel_values"]
        fixed = adapter.build_inputs([normalize_image(data)], ["describe the image ."])["pixel_values"]
        naive = adapter.build_inputs([Image.open(io.BytesIO(data)).convert("RGB")], ["describe the image ."])
        assert torch.equal(ours, fixed) and torch.equal(ours, naive["pixel_values"]) != naive_differs


def test_truncation_keeps_image_tokens_and_the_response(adapter):
    """Cut to a 100-token context: every image token stays, the prompt is cut, and the
    response's log-probability is that of the same response after the cut prompt."""
    from saev_core.model.logprobs import response_logprob

    img = [Image.open(io.BytesIO(encode(rgb(5, 32))))]
    long_prompt = "what colour is the circle ? " * 40
    adapter.max_tokens = 100
    try:
        batch = adapter.build_inputs(img, [long_prompt], ["red circle ."])
        got = response_logprob(adapter, img, [long_prompt], ["red circle ."])[0]
        adapter.max_tokens = None
        cut = batch.fitted_prompts[0]
        want = response_logprob(adapter, img, [cut], ["red circle ."])[0]
    finally:
        adapter.max_tokens = None
    full = adapter.build_inputs(img, ["describe"], ["red circle ."])
    n_image = int((full["input_ids"] == adapter.image_token_id).sum())
    assert int(batch["attention_mask"].sum()) <= 100 and batch.truncated_tokens[0] > 100
    assert int((batch["input_ids"] == adapter.image_token_id).sum()) == n_image > 0
    assert len(cut) < len(long_prompt) and long_prompt.startswith(cut)
    assert got == pytest.approx(want, abs=1e-5)


LONG_ROW_SCRIPT = textwrap.dedent('''
    import json, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from tiny_mllms import build_llava
    from saev_core.data import ingest, storage
    from saev_core.model.activation_cache import ActivationCache, CacheSpec
    from saev_core.model.mllm import MLLMAdapter
    from saev_core.pipeline.stages import _image, cache_record_shard
    from saev_core.sae.metrics import spliced_ce

    tmp = Path(sys.argv[1])
    adapter = MLLMAdapter.from_pretrained(str(build_llava(tmp / "model")), layer=1, device="cpu")
    summary = ingest.ingest_to_storage(sys.argv[2], str(tmp / "work"), "rlaif_v", shard_rows=64,
                                       max_text_chars=100_000)
    shard = summary["shards"][0]["uri"]
    cache = ActivationCache(str(tmp / "acts"), CacheSpec(model_id="tiny", layer=1))
    out = cache_record_shard(adapter, shard, cache, batch_size=16, batch_tokens=4096)
    rows = ingest.read_record_shard(shard).to_pylist()

    class Identity(torch.nn.Module):  # an SAE that reconstructs perfectly: the forwards are what count
        dtype = torch.float32
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
        def encode(self, h): return h
        def decode(self, z): return z

    ce = spliced_ce(adapter, Identity(), [_image(r["image"]) for r in rows], [r["prompt"] for r in rows],
                    [r["chosen"] for r in rows], batch_size=16, batch_tokens=4096)
    print(json.dumps({"truncated": cache.read_truncation(out["key"]), "ids": [r["sample_id"] for r in rows],
                      "chars": [len(r["prompt"]) for r in rows], "ce": ce,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
''')


def test_one_long_row_is_truncated_and_memory_stays_bounded(tmp_path):
    """16 samples, one with a 22,400-character question (~4,800 tokens, context 2,048). Without the
    budgets the forwards of this run peak at ~2.8 GB (benchmarks/long_row_benchmark.py); with them
    ~0.65 GB alone, ~1.2 GB with the full pipeline imported: the bound sits between."""
    import base64

    rows = [row(i, "data:image/png;base64," + base64.b64encode(encode(rgb(i, 32))).decode(),
                question="describe the image .")
            for i in range(16)]
    rows[3]["question"] = "what colour is the circle ? " * 800
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", LONG_ROW_SCRIPT, str(tmp_path), str(path)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    long_id = result["ids"][result["chars"].index(22_400)]
    assert set(result["truncated"]) == {long_id} and result["truncated"][long_id] > 2000
    assert all(np.isfinite(v) for v in result["ce"].values())
    assert result["maxrss_mb"] < 1700, result["maxrss_mb"]
