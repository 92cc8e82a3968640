"""`sinkscope kv calibrate` and `kv generate` on a tiny model directory; options refused before the model loads."""

from __future__ import annotations

import json
import random

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.kv.policy import KVPolicy
from sinkscope.models.random_hf import TINY_WORDS, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")


@pytest.fixture()
def text_file(tmp_path):
    rng = random.Random(0)
    f = tmp_path / "cal.txt"
    f.write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(400)))
    return f


def test_calibrate_then_generate(model_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "pol"
    rc = main(["kv", "calibrate", "--model", model_dir, "--out", str(out), "--file", str(text_file),
               "--length", "48", "--sinks", "2", "--window", "5", "--budget", "0.6"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"policy.json", "full_attention_heads.tsv", "config.json",
                                               "calibration.json"}
    policy = KVPolicy.load(out)
    assert policy.n_full == 2 and policy.measured_kl is not None and policy.model["model_type"] == "llama"
    assert "2 of 4 kv heads keep the full cache" in capsys.readouterr().out
    rc = main(["kv", "generate", "--policy", str(out), "--prompt", "the cat " * 20, "--max-new-tokens", "5",
               "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["new_ids"]) == 5 and got["stored_bytes"] < got["dense_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.5", "--max-kl", "0.1"], "not both"),
    (["--budget", "2"], "--budget is a fraction"),
    (["--budget", "0.01", "--window", "60"], "streaming floor"),
    (["--max-kl", "0"], "--max-kl must be positive"),
    (["--window", "0"], "--window >= 1"),
    (["--length", "10", "--window", "60"], "must exceed"),
    (["--file", "/nonexistent.txt"], "--file not found"),
])
def test_bad_calibrate_options_fail_before_the_model_loads(tmp_path, capsys, args, message) -> None:
    rc = main(["kv", "calibrate", "--model", "/no/such/model", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "no/such/model" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_generate_refuses_a_missing_policy(tmp_path, capsys) -> None:
    assert main(["kv", "generate", "--policy", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no KV policy" in capsys.readouterr().err


def test_ablate_writes_its_results_and_a_ranked_policy(model_dir, text_file, tmp_path, capsys) -> None:
    pol = tmp_path / "pol"
    assert main(["kv", "calibrate", "--model", model_dir, "--out", str(pol), "--file", str(text_file),
                 "--length", "160", "--sinks", "2", "--window", "8", "--budget", "0.6"]) == 0
    capsys.readouterr()
    out = tmp_path / "abl"
    rc = main(["kv", "ablate", "--policy", str(pol), "--model", model_dir, "--out", str(out), "--depths", "0.5",
               "--tasks", "passkey,prose", "--kl-tokens", "32", "--gain", "gain_kl"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"ablation.json", "ablation_heads.csv", "ablation_rows.jsonl", "policy"}
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["probes"]["base"]["streams"] == 1 and summary["probes"]["base"]["retrieval_probes"] == 1
    ranked = KVPolicy.load(out / "policy")
    assert ranked.n_full == KVPolicy.load(pol).n_full and ranked.info["criterion_column"] == "ablation"
    assert "spearman" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--base", "nope"], "--base"), (["--gain", "x"], "--gain"),
                                           (["--tasks", "agree"], "--tasks")])
def test_bad_ablate_options_fail_before_the_model_loads(tmp_path, capsys, args, message) -> None:
    pol = tmp_path / "pol"
    KVPolicy(((0,), ()), n_layers=2, n_kv_heads=2, n_sink=2, window=8, target_length=160,
             head_scores=(((1.0, 0, 0, 1.0),) * 2,) * 2).save(pol)
    rc = main(["kv", "ablate", "--policy", str(pol), "--model", "/no/such/model", "--out", str(tmp_path / "o"),
               *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--budgets", "0.25,x"], "--budgets must be a comma list of numbers, got '0.25,x'"),
    (["--budgets", " , "], "--budgets: give at least one number"),
    (["--lengths", "1024,1.5"], "--lengths must be a comma list of integers"),
    (["--seeds", "nan"], "--seeds must be a comma list of finite integers"),
    (["--methods", "dense,polcy"], "unknown --methods polcy; choose from"),
    (["--tasks", "passkey,needle"], "unknown --tasks needle; choose from"),
])
def test_bad_eval_lists_fail_before_the_model_loads(tmp_path, capsys, args, message) -> None:
    rc = main(["kv", "eval", "--model", "/no/such/model", "--methods", "dense", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "no/such/model" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
