"""saev_core: the SAE-V curation method as a plain library (torch + transformers + SAELens).

No orchestration here: Prefect lives in `tasks/` and `flows/`. Usable from a notebook:

    from saev_core.model.mllm import MLLMAdapter
    from saev_core.sae.training import SAETrainConfig, train_sae, load_sae, encode
    from saev_core.sae.weights import CrossModalWeightsBuilder
    from saev_core.sae.scoring import sample_stats, score_all
"""

__version__ = "0.1.0"
