"""Repeated-token study: generation, scan, run sinkness, circuit localisation, patch evaluation."""
