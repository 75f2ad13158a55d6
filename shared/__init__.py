"""The contract between Switchyard's gateway and workers: Redis names, wire schemas, settings."""
