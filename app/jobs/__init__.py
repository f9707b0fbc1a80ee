"""Distillation jobs: submission, state, events, artifacts, and their execution in the worker."""
