"""The router core: scheduling, the per-image stage script, the bus transport, the result cache."""
