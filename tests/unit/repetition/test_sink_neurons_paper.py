"""The paper's patch (Yona et al.'s published recipe) on a tiny Llama: the sink-layer rule against a plain
computation, the sink neurons' ablation effect, and their patch (every position but the first, no gate)."""

from __future__ import annotations

import pytest
import torch

from sinkscope.capture import forward_hooks
from sinkscope.errors import InputError
from sinkscope.interventions.patch import apply_patch, read_patch
from sinkscope.repetition.sink_neurons_paper import find_sink_layer, find_sink_neurons, sink_neurons_patch


@torch.no_grad()
def test_sink_layer_rule_against_plain_computation(tiny_llama):
    tokens = [5, 9, 17, 33, 60]
    sl = find_sink_layer(tiny_llama, tokens)
    layers = tiny_llama.model.layers
    norms = []
    for layer in layers:
        got = []
        with forward_hooks([(layer.mlp.down_proj, lambda x: got.append(x[:, 0].norm(dim=-1).mean()), False)]):
            tiny_llama(input_ids=torch.tensor([[t] for t in tokens]))
        norms.append(float(got[0]))
    assert sl.mlp_norm == pytest.approx(norms, rel=1e-5)
    first = torch.tensor(norms[:sl.half])
    assert sl.threshold == pytest.approx(float(first.mean() + 2 * first.std()), rel=1e-5)
    want = next((l for l in range(sl.half) if norms[l] > sl.threshold), None)
    assert sl.layer == want
    with pytest.raises(InputError, match="probe token"):
        find_sink_layer(tiny_llama, [])


@pytest.fixture()
def deep_llama():
    from sinkscope.models.random_hf import tiny_model

    return tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=12)


@torch.no_grad()
def test_sink_layer_rule_finds_a_planted_jump(deep_llama):
    deep_llama.model.layers[3].mlp.down_proj.weight.mul_(200.0)  # layer 3's MLP output becomes huge
    sl = find_sink_layer(deep_llama, [5, 9, 17])
    assert sl.half == 6 and sl.layer == 3
    deep_llama.model.layers[8].mlp.down_proj.weight.mul_(1e4)  # a jump in the second half is not looked at
    assert find_sink_layer(deep_llama, [5, 9, 17]).layer == 3


@torch.no_grad()
def test_sink_neurons_and_the_published_patch(deep_llama, tiny_tok):
    tiny_llama = deep_llama
    neurons = find_sink_neurons(tiny_llama, 0, [5, 9, 17], k=4, min_drop=-1.0)
    assert len(neurons) == 4 and neurons[0].score >= neurons[-1].score and all(n.kept for n in neurons)
    strict = find_sink_neurons(tiny_llama, 0, [5, 9, 17], k=4, min_drop=2.0)  # nothing removes 200%
    assert [n.kept for n in strict] == [True, False, False, False]  # the top neuron is kept anyway
    calib = [torch.randint(4, 99, (12,)).tolist() for _ in range(3)]
    with torch.no_grad():
        tiny_llama.model.layers[2].mlp.down_proj.weight.mul_(200.0)
    patch, report = sink_neurons_patch(tiny_llama, tiny_tok, calib, ["poem", "cat", "dog"], base_model="x",
                                       k=2, min_drop=-1.0)
    (rule,) = patch.rules
    assert rule.layer == report["sink_layer"]["layer"] == 2 and patch.gate is None
    assert rule.threshold == [0.0] * len(rule.index) and 1 <= len(rule.index) <= 2
    ids = torch.tensor([calib[0]])
    base = tiny_llama(input_ids=ids).logits
    with apply_patch(tiny_llama, patch) as h:
        pat = tiny_llama(input_ids=ids).logits
        assert h.n_clamped == (ids.shape[1] - 1) * len(rule.index)  # every position but the first
    torch.testing.assert_close(pat[:, 0], base[:, 0])  # never the first token
    assert ((pat - base).abs().amax(-1)[0, 1:] > 0).all()


def test_paper_patch_command_is_deterministic(tmp_path, tiny_tok, capsys):
    """`repeat patch --method paper` twice on the same model, words and corpus: the same manifest, byte for byte
    (issue 21: the documented command must reproduce a frozen patch)."""
    from sinkscope.cli.__main__ import main
    from sinkscope.models.random_hf import tiny_model

    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=12)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.mul_(200.0)  # a sink layer for the rule to find
    model.save_pretrained(tmp_path / "m")
    tiny_tok.save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("the word cat a text . the poem tree book . " * 40)
    manifests = []
    for name in ("a", "b"):
        assert main(["repeat", "patch", "--method", "paper", "-m", str(tmp_path / "m"), "--words", "cat,dog,poem",
                     "--corpus", str(tmp_path / "corpus.txt"), "--save", str(tmp_path / name)]) == 0
        manifests.append((tmp_path / name / "sinkscope_manifest.json").read_bytes())
    assert manifests[0] == manifests[1]
    assert "L3.N" in capsys.readouterr().out
    patch = read_patch(tmp_path / "a")
    assert patch.rules[0].layer == 3 and patch.meta["method"] == "paper"
    assert main(["repeat", "patch", "--method", "yona", "-m", str(tmp_path / "m"), "--words", "cat,dog,poem",
                 "--corpus", str(tmp_path / "corpus.txt"), "--save", str(tmp_path / "c")]) == 0  # the alias
    assert (tmp_path / "c" / "sinkscope_manifest.json").read_bytes() == manifests[0]


@pytest.mark.slow
def test_frozen_paper_patch_is_reproduced(smollm2):
    """docs/results/repeat_eval_cpu/patches/yona was built when the default corpus was a few built-in paragraphs
    (kept beside it as calibration.txt); with that corpus the command gives its rule again."""
    import json
    from pathlib import Path

    from sinkscope.repetition.patch_methods import PaperOptions, build_patch

    frozen_dir = Path(__file__).resolve().parents[3] / "docs" / "results" / "repeat_eval_cpu" / "patches" / "yona"
    frozen = json.loads((frozen_dir / "sinkscope_manifest.json").read_text())
    model, tok = smollm2
    built = build_patch("yona", PaperOptions(corpus=str(frozen_dir / "calibration.txt")), base_model="smollm2-135m",
                        model=model, tokenizer=tok)
    (rule,) = built.patch.rules
    (want,) = frozen["rules"]
    assert (rule.layer, rule.index, rule.threshold) == (want["layer"], want["index"], want["threshold"])
    assert rule.value == pytest.approx(want["value"], rel=1e-5)  # -0.00103, -0.1586 (WikiText gives -0.00054, -0.130)
    assert built.patch.meta["probe_words"] == frozen["meta"]["probe_words"]
