"""The package version, in one place: pyproject.toml reads it without importing fdp or torch."""

__version__ = "0.2.0.dev0"
