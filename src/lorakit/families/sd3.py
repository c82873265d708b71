"""Placeholder: filled in by the sd3 family work."""
