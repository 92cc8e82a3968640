"""Divergence scan (resume without redoing cells) and the `sinkscope repeat` CLI on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.repetition.scan import CELLS_FILE, ScanPlan, read_cells, scan_repetition, summarise


def test_scan_resumes(tiny_llama, tiny_tok, tmp_path: Path):
    plan = ScanPlan(["cat", "dog"], [2, 4], ["instruct", "bare"], max_new_tokens=4, batch_size=3,
                    sinkness_words=["cat"])
    batches: list[str] = []
    cells = scan_repetition(tiny_llama, tiny_tok, plan, tmp_path, on_batch=batches.append)
    assert len(cells) == 8 and len(read_cells(tmp_path)) == 8
    # 4 length groups of 2 prompts (batch size 3): no full group, so the remainders are pooled in length order
    assert batches == ["3 rows of 2-4 tokens", "3 rows of 4-14 tokens", "2 rows of 16 tokens"], batches
    cat = next(c for c in cells if c["word"] == "cat" and c["n"] == 4 and c["form"] == "bare")
    s = cat["sinkness"]
    assert len(s["cos_first"]) == 2 and len(s["alpha_run"]) == 2 and 0.0 <= cat["sink_share_max"] <= 1.0
    assert "sinkness" not in next(c for c in cells if c["word"] == "dog")
    lines = (tmp_path / CELLS_FILE).read_text().splitlines()
    (tmp_path / CELLS_FILE).write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-line
    seen = []
    again = scan_repetition(tiny_llama, tiny_tok, plan, tmp_path, on_cells=lambda d, t: seen.append(d))
    assert seen[0] == 5 and seen[-1] == 8
    assert [c["diverged"] for c in again] == [c["diverged"] for c in cells]
    rows = summarise(again)
    assert {(r["form"], r["n"]) for r in rows} == {("instruct", 2), ("instruct", 4), ("bare", 2), ("bare", 4)}
    assert all(r["words"] == 2 for r in rows)


def test_cli_scan_tiny(tiny_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "scan"
    rc = main(["repeat", "scan", "--model", str(tiny_dir), "--out", str(out), "--words", "cat,dog",
               "--lengths", "2,8", "--forms", "instruct,garak3", "--max-new-tokens", "3"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["summary"]) == 4
    assert (out / "divergence_vs_length.png").is_file() and (out / "similarity_instruct.png").is_file()


@pytest.mark.parametrize("args, msg", [
    (["--words", "cat dog"], "tokens"),
    (["--words", "cat", "--lengths", "0"], "positive"),
    (["--words", "cat", "--lengths", "4096"], "context"),
    (["--words", "cat", "--forms", "sonnet"], "unknown prompt form"),
])
def test_cli_bad_input(tiny_dir: Path, tmp_path: Path, capsys, args, msg):
    rc = main(["repeat", "scan", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and msg in err and "\n" not in err


def test_chain_yaml_builds_only_valid_repeat_commands(monkeypatch):
    """experiments/repeat_chain.yaml -> one `sinkscope repeat ...` per step, every option known to its command."""
    import importlib.util
    from pathlib import Path

    import typer

    from sinkscope.cli.repeat import app

    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("repeat_chain", root / "experiments" / "repeat_chain.py")
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)
    calls: list[list[str]] = []
    monkeypatch.setattr(chain, "cli", lambda argv: calls.append(argv) or 0)
    assert chain.run(str(root / "experiments" / "repeat_chain.yaml")) == 0
    group = typer.main.get_command(app)
    assert {a[1] for a in calls} >= {"scan", "circuit", "patch", "evaluate", "cluster"}
    for argv in calls:
        assert argv[0] == "repeat"
        command = group.commands[argv[1]]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        assert {a for a in argv[2:] if a.startswith("--")} <= known, argv
