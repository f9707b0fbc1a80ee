"""Distillery's HTTP service: FastAPI routers over services, repositories and storage.

Nothing in this package imports torch at module level; the engine's torch-free
modules (spec, inspection, data, errors) are all the API needs.
"""
