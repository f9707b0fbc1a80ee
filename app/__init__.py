"""Distillery's HTTP service and the domain it serves: routers over services, repositories,
tables, storage and settings.

Nothing here imports torch, nor anything of ``worker/`` beyond the engine's
torch-free modules the API validates with (spec, errors, signature,
inspection, compatibility, archive, data); ``tests/test_layout.py`` checks both.
"""
