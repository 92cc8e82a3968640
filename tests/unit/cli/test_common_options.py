"""The options every model-loading command shares, checked before any heavy import."""

from __future__ import annotations

import pytest
import torch

from sinkscope.cli.common import check_device, check_dtype, load_cli_model
from sinkscope.errors import InputError, ModelLoadError
from sinkscope.models.tiny import save_tiny


@pytest.mark.parametrize("device, message", [
    ("gpu", "is not a device"),
    ("cuda:7" if torch.cuda.is_available() else "cuda", "CUDA device"),
])
def test_bad_devices_are_refused_in_one_line(device: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as e:
        check_device(device)
    assert "\n" not in str(e.value)


def test_good_options_pass() -> None:
    assert check_device("cpu") == "cpu" and check_device("auto") == "auto"
    assert check_dtype("bfloat16") == "bfloat16"
    with pytest.raises(InputError, match="--dtype 'int8'"):
        check_dtype("int8")


def test_load_cli_model_applies_dtype_and_refuses_local_revisions(tmp_path) -> None:
    d = save_tiny(str(tmp_path / "m"), "llama")
    model, _ = load_cli_model(d, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="--revision applies to hub models"):
        load_cli_model(d, revision="main")
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
