"""Prefect tasks: one module per stage. Each calls the library, keys and caches its output on disk, and logs
a child MLflow run. Tasks hand each other paths, never models."""
