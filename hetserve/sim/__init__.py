"""Discrete-event simulation of serving: the real scheduler, the cost model's forward pass."""
