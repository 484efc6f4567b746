"""Specialists: tiny task models distilled from a large model's answers, each a model of the
fleet with a card, a measured cost per call and a calibrated confidence (docs/specialists.md)."""
