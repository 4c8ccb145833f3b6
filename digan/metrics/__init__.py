"""digan.metrics."""
