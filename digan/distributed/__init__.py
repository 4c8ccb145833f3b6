"""digan.distributed."""
