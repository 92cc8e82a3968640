"""Run configs: YAML 1:1 with dataclasses, base files, dotted overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkscope.training.config import ConfigError, config_from_dict, load_config


def test_base_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model: {d_model: 32, n_heads: 4}\noptim: {lr: 1.0e-3}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nmodel: {attention: relu}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.name=sgd", "optim.lr=2e-2", "model.window=8"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.attention, cfg.model.window) == (32, 4, "relu", 8)
    assert (cfg.optim.name, cfg.optim.lr) == ("sgd", 0.02)
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg  # the resolved YAML maps back onto the same config


@pytest.mark.parametrize("d,overrides,needle", [
    ({"model": {"attention": "softmaxx"}}, [], "unknown attention kind 'softmaxx'"),
    ({"model": {"d_model": 30, "n_heads": 4}}, [], "does not divide"),
    ({"modle": {}}, [], "unknown section 'modle'"),
    ({}, ["optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ({}, ["train.steps=ten"], "train.steps: expected an integer"),
    ({}, ["optim.name=lion"], "unknown optimiser 'lion'"),
    ({}, ["steps=3"], "expected section.key=value"),
])
def test_bad_configs_are_one_line(d: dict, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
