"""Test kit: drive entities against a real journal in tests.

Nothing in the lagompy package imports this module; it may use every layer.
"""

from lagompy.testkit.driver import EntityTestDriver, Issue, Outcome

__all__ = ["EntityTestDriver", "Issue", "Outcome"]
