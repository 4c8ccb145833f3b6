"""digan.models."""
