"""Model implementations and the checkpoint loader."""
