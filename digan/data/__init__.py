"""digan.data."""
