"""sinkscope: find, measure, explain and fix attention sinks and extreme tokens in transformer LMs."""

from sinkscope.inputs import TokenBatch as TokenBatch
from sinkscope.inputs import file_inputs as file_inputs
from sinkscope.inputs import random_inputs as random_inputs
from sinkscope.inputs import repeat_inputs as repeat_inputs
from sinkscope.inputs import text_inputs as text_inputs
from sinkscope.models.adapters import get_adapter as get_adapter
from sinkscope.models.adapters import supported_architectures as supported_architectures
from sinkscope.models.load import load_model as load_model
from sinkscope.profile import SinkProfile as SinkProfile
from sinkscope.profile import profile_sinks as profile_sinks

__version__ = "0.1.0"
