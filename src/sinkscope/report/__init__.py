"""`sinkscope report`: one self-contained HTML page on a model's extreme tokens."""
