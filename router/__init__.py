"""The gRPC router: tokenizes, places (cache affinity, load, conditional disaggregation) and streams."""
