"""Pipelines: typed steps over models and plain Python, run within a budget and a deadline."""
