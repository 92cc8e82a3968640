"""Query / sink-key cosines equal a manual computation from the captured q and k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkscope.analyses.qk_alignment import qk_alignment
from sinkscope.errors import InputError
from sinkscope.models.random_hf import tiny_model
from sinkscope.profile import profile_sinks


@torch.no_grad()
def test_alignment_matches_profile_first_key() -> None:
    model = tiny_model("llama")
    ids = list(range(5, 25))
    al = qk_alignment(model, ids, positions=[0, 3])
    prof = profile_sinks(model, [ids])
    # position 0's mean over queries t > 0 is exactly the profile's cos_first
    assert np.allclose(al.mean[:, :, 0], prof.cos_first[0], atol=1e-5)
    assert al.hist.shape[:2] == (2, 2) and np.allclose(al.hist[:, 0].sum(-1), 4 * (len(ids) - 1))
    with pytest.raises(InputError):
        qk_alignment(model, ids, positions=[len(ids)])
