"""Benchmarks: serving load (`ember bench serve`) and others; JSON + PNG reports."""
