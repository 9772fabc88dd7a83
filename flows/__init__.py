"""Prefect flows composing the stage tasks, and the `compactlm` CLI."""
