"""Fixtures and helpers shared by the test files (pytest puts this folder on sys.path)."""
from __future__ import annotations

from pg2_server.bench import free_port  # noqa: F401  (one definition, shared with the bench)
