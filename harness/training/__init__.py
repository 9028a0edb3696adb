"""Training of draft heads (``python -m harness train METHOD``) on the frozen base model."""
