"""Placeholder: filled in by the wan family work."""
