"""multipromot."""
