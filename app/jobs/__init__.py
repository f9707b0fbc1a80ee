"""Distillation jobs: submission, state, events and artifacts (``worker.runner`` runs them)."""
