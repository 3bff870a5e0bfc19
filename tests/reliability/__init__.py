"""Helpers of the reliability tests (fault injection, checkers, the report generator)."""
