"""Train TRL's DPOTrainer on a subset published by the `curate` flow, read straight from its URI.

    # the local stack (make stack-up && make deploy), after a run has published:
    set -a; . .stack/stack.env; . .stack/credentials.env; set +a
    python examples/dpo_train.py --run s3://saev-curate/on-demand/toy-rlaif-v/<run_id> \
        --endpoint-url "$SAEV_S3_ENDPOINT" --steps 5

    # any other published run (local folder or s3://), any LLaVA-style model folder:
    python examples/dpo_train.py --run runs/toy-rlaif-v/<run_id> --subset top-50 --model /path/to/model

Only `datasets`, `fsspec`/`s3fs`, `transformers` and `trl` are used here: this is what a training
job outside this repository does with a published run. S3 credentials come from the usual AWS
environment variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never from the command line.
Do not set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE here: `datasets` then refuses s3:// files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile


def storage_options(uri: str, endpoint_url: str | None) -> dict:
    """fsspec options for the output URI (empty for local paths). `endpoint_url` goes top-level
    for s3fs; credentials are picked up from the environment by botocore."""
    if not uri.startswith("s3://"):
        return {}
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


def read_manifest(run: str, options: dict) -> dict:
    """The manifest is written last: a run without one is incomplete and must not be trained on."""
    import fsspec

    with fsspec.open(f"{run.rstrip('/')}/manifest.json", "rt", **options) as fh:
        return json.load(fh)


def load_subset(run: str, subset: str | None, options: dict, limit: int | None = None):
    """The published subset as a `datasets.Dataset` (images decoded to PIL by its Image features)."""
    import datasets

    manifest = read_manifest(run, options)
    # top-<p> by p first (the default is the smallest), other subsets (a pinned run's `kept`) after
    names = sorted(manifest["subsets"], key=lambda n: (0, float(n[4:])) if n.startswith("top-") else (1, n))
    subset = subset or names[0]
    if subset not in manifest["subsets"]:
        raise SystemExit(f"{run} has no subset {subset!r}; it has {names}")
    files = f"{run.rstrip('/')}/subsets/{subset}/*.parquet"
    # load_dataset adds keys to the storage_options dict it is given: pass a copy.
    ds = datasets.load_dataset("parquet", data_files=files, split="train", storage_options=dict(options))
    if limit:
        ds = ds.select(range(min(limit, ds.num_rows)))
    return ds, manifest, subset


def to_conversational(example: dict) -> dict:
    """Published prompts are plain questions; TRL's vision collator inserts the image into the
    first user turn and applies the model's own chat template to conversational samples."""
    return {"prompt": [{"role": "user", "content": example["prompt"]}],
            "chosen": [{"role": "assistant", "content": example["chosen"]}],
            "rejected": [{"role": "assistant", "content": example["rejected"]}]}


def resolve_model(model: str) -> str:
    if model == "toy":
        from saev_core.toyworld import toy_model_path

        return str(toy_model_path())
    return model


def train(run: str, subset: str | None = None, model: str = "toy", endpoint_url: str | None = None,
          steps: int = 3, batch_size: int = 2, lr: float = 1e-4, beta: float = 0.1, limit: int | None = None,
          output_dir: str | None = None, seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    options = storage_options(run, endpoint_url)
    ds, manifest, subset = load_subset(run, subset, options, limit)
    ds = ds.map(to_conversational, remove_columns=["sample_id", "score"])

    path = resolve_model(model)
    torch.manual_seed(seed)
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)

    with tempfile.TemporaryDirectory(prefix="saev-dpo-") as tmp:
        args = DPOConfig(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=lr, beta=beta, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, gradient_checkpointing=False,
            max_length=None, dataloader_num_workers=0, seed=seed, disable_tqdm=True,
        )
        trainer = DPOTrainer(model=policy, args=args, train_dataset=ds, processing_class=processor)
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if output_dir:
            trainer.save_model(output_dir)
    result = {"run": run, "run_id": manifest["run_id"], "subset": subset, "rows": ds.num_rows,
              "steps": out.global_step, "losses": losses, "train_loss": out.training_loss,
              "finite": all(math.isfinite(x) for x in losses) and math.isfinite(out.training_loss)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="published run folder: <output>/<dataset>/<run_id> (local or s3://)")
    ap.add_argument("--subset", help="e.g. top-25 (default: the smallest subset in the manifest)")
    ap.add_argument("--model", default="toy", help="model folder; 'toy' = the shipped toy LLaVA")
    ap.add_argument("--endpoint-url", default=os.environ.get("SAEV_S3_ENDPOINT"),
                    help="S3 endpoint for s3:// runs (default: $SAEV_S3_ENDPOINT; unset = AWS)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--limit", type=int, help="use at most this many samples")
    ap.add_argument("--output-dir", help="save the trained policy here (default: not saved)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)
    res = train(a.run, a.subset, a.model, a.endpoint_url, a.steps, a.batch_size, a.lr, a.beta, a.limit,
                a.output_dir)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"DPO on {res['run']} [{res['subset']}, {res['rows']} samples]: {res['steps']} steps, "
              f"losses {[round(x, 4) for x in res['losses']]}")
    return 0 if res["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
