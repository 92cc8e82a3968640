"""sinkscope: find, measure, explain and fix attention sinks and extreme tokens in transformer LMs."""

from sinkscope.models.load import load_model as load_model

__version__ = "0.1.0"
