"""The decode role: a thin wrapper of the engine (and, in the cluster, its Ray actor)."""
