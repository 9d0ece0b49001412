"""Thin Ray adapters (Train, Tune) around the Ray-free core."""
