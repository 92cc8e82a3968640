"""Registers every built-in artefact kind with the model loader and exposes the loader that knows them all.

`sinkscope.models.load` sits below the modules that own artefacts (saved patches in `sinkscope.interventions`,
training runs in `sinkscope.training`) and never imports them; importing this module (the public
``sinkscope.load_model`` and the CLI do) lets them register (`sinkscope.artefacts`).
"""

from __future__ import annotations

import sinkscope.interventions.patch  # noqa: F401 - registers "repeat_patch"
import sinkscope.training.run  # noqa: F401 - registers "tinygpt_run"
from sinkscope.models.load import load_model as load_model
