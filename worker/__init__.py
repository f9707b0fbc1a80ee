"""Distillery's worker side: what runs in a worker process, on the domain of ``app``.

``celery_app`` and ``tasks`` (thin tasks that take ids), ``runner`` (a job's
claim, lease, fenced writes and engine callbacks), ``upload_inspection``,
``reconciler``, ``webhook_delivery`` and ``sessions``; ``worker.engine`` is the
distillation engine, a library that imports nothing outside itself.
"""
