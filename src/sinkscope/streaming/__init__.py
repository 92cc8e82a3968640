"""Streaming with attention sinks (StreamingLLM): a sink + window KV cache, endless generation, long-stream PPL
(token by token, or in exact blocks for the fixed-mask policies)."""

from sinkscope.streaming.cache import RotaryShift as RotaryShift
from sinkscope.streaming.cache import SinkWindowCache as SinkWindowCache
from sinkscope.streaming.cache import SinkWindowLayer as SinkWindowLayer
from sinkscope.streaming.cache import kv_cache_bytes as kv_cache_bytes
from sinkscope.streaming.cache import sink_cache as sink_cache
from sinkscope.streaming.generate import GenerateOptions as GenerateOptions
from sinkscope.streaming.generate import StreamToken as StreamToken
from sinkscope.streaming.generate import encode_prompt as encode_prompt
from sinkscope.streaming.generate import prefill as prefill
from sinkscope.streaming.generate import stream_generate as stream_generate
from sinkscope.streaming.ppl import PolicyResult as PolicyResult
from sinkscope.streaming.ppl import StreamEval as StreamEval
from sinkscope.streaming.ppl import StreamOptions as StreamOptions
from sinkscope.streaming.ppl import banded_nll as banded_nll
from sinkscope.streaming.ppl import evaluate_stream as evaluate_stream
from sinkscope.streaming.ppl import recompute_nll as recompute_nll
from sinkscope.streaming.ppl import stream_nll as stream_nll
