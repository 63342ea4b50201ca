"""The transfer service: money transfers between accounts as a durable workflow."""
