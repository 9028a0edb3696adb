"""specdec-harness: benchmark speculative-decoding methods side by side on one engine."""

__version__ = "0.1.0"
