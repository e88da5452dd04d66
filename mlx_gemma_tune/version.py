"""The package version (pyproject.toml's), recorded in every converted model's provenance."""

VERSION = "0.1.0"
