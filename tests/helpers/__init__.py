"""Helpers shared by test modules (tests import them from here, never from each other)."""
