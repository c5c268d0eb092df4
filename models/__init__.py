"""Builders for small test models, bundled examples, and the real model zoo fetcher."""
