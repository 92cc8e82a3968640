"""The options every model-loading command shares, checked before any heavy import."""

from __future__ import annotations

import pytest
import torch

from sinkscope.cli.common import ModelOptions, load_cli_model
from sinkscope.errors import InputError, ModelLoadError
from sinkscope.models.random_hf import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("m") / "llama"), "llama")


@pytest.mark.parametrize("device, message", [
    ("gpu", "is not a device"),
    ("cuda:7" if torch.cuda.is_available() else "cuda", "CUDA device"),
])
def test_bad_devices_are_refused_in_one_line(model_dir: str, device: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as e:
        ModelOptions(model_dir, device=device)
    assert "\n" not in str(e.value) and "--device" in str(e.value)


def test_good_options_pass_and_bad_dtypes_are_refused(model_dir: str) -> None:
    assert ModelOptions(model_dir, device="auto", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(InputError, match="--dtype 'int8'"):
        ModelOptions(model_dir, dtype="int8")


def test_load_cli_model_applies_dtype_and_refuses_local_revisions(model_dir: str) -> None:
    model, _ = load_cli_model(model_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="--revision applies to hub models"):
        load_cli_model(model_dir, revision="main")
    with pytest.raises(ModelLoadError, match="not found"):
        load_cli_model("./no/such/model", device="gpu")  # the spec is checked first


#: every command that loads a pretrained model (train builds its own from a config)
MODEL_COMMANDS = [("scan",), ("report",), ("stream", "eval"), ("stream", "generate"), ("repeat", "scan"),
                  ("repeat", "circuit"), ("repeat", "patch"), ("repeat", "evaluate"), ("repeat", "cluster")]


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=" ".join)
def test_every_model_loading_command_takes_the_shared_options(path: tuple[str, ...]) -> None:
    import typer.main

    from sinkscope.cli.__main__ import app

    group = typer.main.get_command(app)
    cmd = group
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    flags = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    assert {"--device", "--dtype", "--revision", "--trust-remote-code"} <= flags, (path, sorted(flags))
