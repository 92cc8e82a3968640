"""Extreme-token metrics: sinks, value drains, residual peaks / massive activations, q-k alignment, dormancy."""
