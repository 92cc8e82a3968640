"""Divergence scan (resume without redoing cells) and the `sinkscope repeat` CLI on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main
from sinkscope.repetition.grid import CELLS_FILE, NO_PATCH, GridPlan, read_cells, run_grid, summarise_cells
from sinkscope.repetition.prompts import build_prompt
from sinkscope.repetition.sinkness import run_sinkness


def test_scan_grid_sinkness_and_resume(tiny_llama, tiny_tok, tmp_path: Path):
    """`repeat scan`'s grid: one variant, the sinkness pass for the chosen words only, resumed mid-file."""
    plan = GridPlan(["cat", "dog"], ["instruct", "bare"], [2, 4], max_new_tokens=4, batch_size=3,
                    sinkness_words=["cat"])
    whats: list[str] = []
    cells = run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None}, tmp_path,
                     progress=lambda d, t, what: whats.append(what)).cells
    assert len(cells) == 8 and len(read_cells(tmp_path)) == 8
    # 4 length groups of 2 prompts (batch size 3): no full group, so the remainders are pooled in length order
    assert whats[:-1] == ["none: 3 rows of 2-4 tokens", "none: 3 rows of 4-14 tokens", "none: 2 rows of 16 tokens"]
    cat = next(c for c in cells if c["word"] == "cat" and c["n"] == 4 and c["form"] == "bare")
    s = run_sinkness(tiny_llama, build_prompt(tiny_tok, "cat", 4, "bare").ids,
                     build_prompt(tiny_tok, "cat", 4, "bare").run_start)
    assert cat["sinkness"] == json.loads(json.dumps(s.to_json()))
    assert cat["sink_share_max"] == s.summary()["sink_share_max"]
    assert "sinkness" not in next(c for c in cells if c["word"] == "dog")
    lines = (tmp_path / CELLS_FILE).read_text().splitlines()
    (tmp_path / CELLS_FILE).write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-line
    seen = []
    again = run_grid(tiny_llama, tiny_tok, plan, {NO_PATCH: None}, tmp_path,
                     progress=lambda d, t, what: seen.append(d)).cells
    assert seen[0] == 5 and seen[-1] == 8 and len(read_cells(tmp_path)) == 8
    assert [c["continuation"] for c in again] == [c["continuation"] for c in cells]
    rows = summarise_cells(again)
    assert {(r["form"], r["n"]) for r in rows} == {("instruct", 2), ("instruct", 4), ("bare", 2), ("bare", 4)}
    assert all(r["words"] == 2 for r in rows)
    bare4 = next(r for r in rows if (r["form"], r["n"]) == ("bare", 4))
    assert bare4["sink_share_max"] == cat["sink_share_max"]  # the mean over the one measured word


def test_cli_scan_tiny(tiny_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "scan"
    rc = main(["repeat", "scan", "--model", str(tiny_dir), "--out", str(out), "--words", "cat,dog",
               "--lengths", "2,8", "--forms", "instruct,garak3", "--max-new-tokens", "3"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["form"], r["n"]) for r in summary["summary"]] == [("garak3", 2), ("garak3", 8), ("instruct", 2),
                                                                 ("instruct", 8)]
    cells = read_cells(out)
    for r in summary["summary"]:  # the summary counts the cells' verdicts
        cs = [c for c in cells if (c["form"], c["n"]) == (r["form"], r["n"])]
        assert (r["diverged"], r["stopped"], r["repeats"]) == tuple(
            sum(c["verdict"] == v for c in cs) for v in ("diverged", "stopped", "repeats"))
    assert summary["settings"]["max_new_tokens"] == 3 and summary["plan"]["words"] == ["cat", "dog"]
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
