"""Tenants and their API keys (bearer tokens stored only as hashes)."""
