"""Decoding methods: ``core/`` (engine, KV cache, trees, acceptance, the decode loop) at the
bottom, one folder per method above it, and ``registry`` to find them by name."""
