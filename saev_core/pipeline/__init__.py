"""The pipeline's stages as plain functions and typed specs: what the Prefect tasks wrap."""
