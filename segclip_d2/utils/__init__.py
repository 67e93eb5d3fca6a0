"""Small shared helpers (weight loading for open_clip models)."""
