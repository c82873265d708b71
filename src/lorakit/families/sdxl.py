"""Placeholder: filled in by the sdxl family work."""
