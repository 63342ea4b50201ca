"""A small service that records notifications; the user service calls it on registration."""
