"""Extreme-token statistics: what a sink is (`sink`), attention column statistics in chunks (`attention_stats`),
massive activations (`massive`)."""
