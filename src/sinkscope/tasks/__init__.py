"""Task inputs: repeated-token prompts (and other tasks of the project)."""
