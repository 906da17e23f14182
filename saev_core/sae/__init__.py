"""The SAE side: SAELens glue (train, load, save, encode), cross-modal weights, scores,
metrics and detection evaluation. The training API is re-exported here:

    from saev_core.sae import SAETrainConfig, train_sae, encode, load_sae, save_sae
"""

from .training import SAECheckpointError, SAETrainConfig, encode, load_sae, save_sae, train_sae

__all__ = ["SAECheckpointError", "SAETrainConfig", "encode", "load_sae", "save_sae", "train_sae"]
