"""Plots (data -> matplotlib Figure, no I/O) and report assembly."""
