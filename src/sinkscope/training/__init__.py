"""Training lab: tinygpt on Bigram-Backcopy or text, with sink / value-drain / residual-peak metrics over training."""

from __future__ import annotations

from sinkscope.training.config import RunConfig as RunConfig
from sinkscope.training.config import load_config as load_config
from sinkscope.training.loop import RunResult as RunResult
from sinkscope.training.loop import train as train
