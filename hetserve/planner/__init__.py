"""Placement: device profiles, cost model, and the plans that say where layers and KV live."""
