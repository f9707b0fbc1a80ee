"""Distillery worker: the Celery side and the distillation engine (``worker.engine``)."""
