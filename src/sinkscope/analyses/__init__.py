"""Analyses built on profiles: dormant heads across input domains, query-key alignment of sink keys."""
