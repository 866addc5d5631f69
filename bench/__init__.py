"""Benchmarks that drive a real patchserve process over HTTP (``make bench``)."""
