"""Unit tests: fast, no network, real files and real SQLite."""
