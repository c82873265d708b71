"""Placeholder: filled in by the cosmos family work."""
