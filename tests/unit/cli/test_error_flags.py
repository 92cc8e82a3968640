"""Library errors name parameters (``max_tokens``); the CLI shows the flag the user typed (``--max-tokens``);
``sinkscope --version``."""

from __future__ import annotations

import pytest

import sinkscope
from sinkscope.cli.__main__ import main
from sinkscope.errors import InputError
from sinkscope.inputs import text_inputs
from sinkscope.models.random_hf import save_tiny, tiny_tokenizer


def test_library_names_the_parameter() -> None:
    with pytest.raises(InputError, match="^max_tokens must be a positive integer") as e:
        text_inputs(tiny_tokenizer(), ["the cat"], max_tokens=0)
    assert e.value.param == "max_tokens"


def test_cli_names_the_flag(tmp_path, capsys: pytest.CaptureFixture) -> None:
    model = save_tiny(str(tmp_path / "llama"))
    capsys.readouterr()
    rc = main(["scan", "--model", model, "--text", "the cat", "--max-tokens", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: --max-tokens must be a positive integer, got 0"


def test_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sinkscope {sinkscope.__version__}"


def test_one_token_scan_says_there_is_no_peak(tmp_path, capsys: pytest.CaptureFixture) -> None:
    model = save_tiny(str(tmp_path / "llama"))
    capsys.readouterr()
    assert main(["scan", "--model", model, "--text", "cat", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "no residual peak" in out.out + out.err and "nan" not in (out.out + out.err).lower()
