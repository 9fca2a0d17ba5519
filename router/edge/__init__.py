"""The router's HTTP edge: endpoints, bodies, limits, auth, streaming and responses."""
