"""Exact byte meter and fvcore-based FLOP meter."""
