"""pdserve's command line and serving configuration."""
