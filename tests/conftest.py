"""Shared by both tiers: nothing here starts PostgreSQL (see tests/integration/conftest.py)."""
