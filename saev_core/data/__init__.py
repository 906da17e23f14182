"""Data in and out: storage URIs, canonical records, ingest adapters, publishing, validation."""
