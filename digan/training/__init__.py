"""digan.training."""
