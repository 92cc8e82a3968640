"""profile_sinks on what notebooks hand it (tokenizer outputs, padded either side), SinkProfile.to_pandas, and a
bf16 model profiled with finite numbers close to fp32's."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from sinkscope.errors import InputError
from sinkscope.inputs import pad_batch
from sinkscope.models.random_hf import tiny_model, tiny_tokenizer
from sinkscope.profile import SinkProfile, profile_sinks

SEQS = [[1, 5, 6, 7, 8, 9], [1, 10, 11]]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(llama) -> SinkProfile:
    return profile_sinks(llama, SEQS)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("as_tensors", [True, False])
def test_tokenizer_outputs_give_the_same_profile(llama, reference: SinkProfile, side: str, as_tensors: bool) -> None:
    ids, mask = pad_batch(SEQS, 0, side=side)
    enc = {"input_ids": ids, "attention_mask": mask}
    if not as_tensors:
        enc = {k: v.tolist() for k, v in enc.items()}
    prof = profile_sinks(llama, enc)
    assert prof.lengths.tolist() == [6, 3]
    np.testing.assert_array_equal(prof.alpha, reference.alpha)


def test_batch_encoding_of_a_real_tokenizer(llama) -> None:
    tok = tiny_tokenizer()
    enc = tok(["the cat is on the old tree", "a dog"], padding=True, return_tensors="pt")
    assert type(enc).__name__ == "BatchEncoding"
    prof = profile_sinks(llama, enc)
    assert prof.lengths.tolist() == [7, 2]
    single = profile_sinks(llama, tok("the cat is on the old tree"))  # one text: a flat list of ids
    np.testing.assert_allclose(single.alpha[0], prof.alpha[0], atol=1e-6)


@pytest.mark.parametrize("bad,needle", [
    ("the cat", "tokenise it first"),
    ({"ids": [[1, 2]]}, "needs 'input_ids'"),
    ([[1, 2.5]], "integer token ids"),
    (42, "must be token ids"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "different shapes"),
    ([[1, 99]], "vocab_size=99"),
])
def test_anything_else_is_one_line_input_error(llama, bad, needle: str) -> None:
    with pytest.raises(InputError, match=needle) as e:
        profile_sinks(llama, bad)
    assert "\n" not in str(e.value)


def test_to_pandas_long_format(reference: SinkProfile) -> None:
    df = reference.to_pandas()
    assert list(df.columns) == ["sample", "layer", "head", "key_position", "statistic", "value"]
    alpha = df[df.statistic == "alpha"]
    assert len(alpha) == 2 * 4 * (6 + 3)  # layers x heads x real positions: padding left out
    row = alpha[(alpha["sample"] == 1) & (alpha["layer"] == 1) & (alpha["head"] == 2) & (alpha["key_position"] == 0)]
    assert float(row.value.iloc[0]) == pytest.approx(reference.alpha[1, 1, 2, 0])
    resid = df[df.statistic == "residual_norm"]
    assert resid["head"].isna().all() and len(resid) == 2 * (6 + 3)
    cos = df[df.statistic == "cos_first"]
    assert cos["key_position"].isna().all() and len(cos) == 2 * 2 * 4
    assert set(df[df.statistic == "value_norm"]["head"]) == {0, 1}  # key/value heads


def test_to_pandas_without_pandas_says_how_to_install(reference: SinkProfile, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pip install 'sinkscope\[pandas\]'"):
        reference.to_pandas()


def test_bf16_model_profiles_close_to_fp32(llama, reference: SinkProfile) -> None:
    bf16 = tiny_model("llama").to(torch.bfloat16)
    prof = profile_sinks(bf16, SEQS)
    for name in ("alpha", "value_norm", "residual_norm", "cos_first", "cos_other", "out_norm"):
        got, want = getattr(prof, name), getattr(reference, name)
        assert got.dtype == want.dtype, name  # accumulated and stored in fp32/fp64 whatever the model dtype
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.03, err_msg=name)
    assert prof.sink_ratio(0) == reference.sink_ratio(0)


@pytest.mark.parametrize("call, needle", [
    (lambda p: p.sink_ratio(0.5), "k must be an integer >= 0, got 0.5"),
    (lambda p: p.sink_ratio(-1), "k must be an integer >= 0, got -1"),
    (lambda p: p.sink_ratio(6), "no sample is longer than position 6"),
    (lambda p: p.sink_ratio(0, eps=2), "eps must be in (0, 1), got 2"),
    (lambda p: p.sink_ratio(0, eps=-1), "eps must be in (0, 1), got -1"),
    (lambda p: p.sink_ratio_by_position(eps=float("nan")), "eps must be in (0, 1), got nan"),
    (lambda p: p.top_sinks(n=-3), "n must be an integer >= 0, got -3"),
    (lambda p: p.head_sink_rate(1.0), "k must be an integer >= 0"),
])
def test_profile_methods_check_their_arguments_as_profile_sinks_does(reference: SinkProfile, call, needle) -> None:
    with pytest.raises(InputError) as e:
        call(reference)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_profile_methods_take_what_profile_sinks_takes(reference: SinkProfile) -> None:
    assert reference.sink_ratio(5) == reference.sink_ratio(np.int64(5))  # numpy integers are positions too
    assert reference.top_sinks(0) == []
    with pytest.raises(InputError, match="eps must be in"):
        profile_sinks(tiny_model("llama"), SEQS, eps=1.0)  # the same check, from the same home


def test_to_json_of_a_one_token_input_is_strict_json(llama) -> None:
    import json

    got = profile_sinks(llama, [[5]]).to_json()
    text = json.dumps(got, allow_nan=False)  # raises on a NaN left in
    assert got["residual_peak"] is None and got["residual_ratio_first_by_layer"] == [None, None]
    assert json.loads(text)["sink_ratio"] == 1.0  # one token attends only to itself: alpha_0 = 1 in every head
