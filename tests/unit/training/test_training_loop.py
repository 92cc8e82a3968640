"""Training loop: outputs, exact resume, DDP equality, checkpoint errors, CLI one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sinkscope.cli.__main__ import main as cli_main
from sinkscope.training.checkpoint import CheckpointError
from sinkscope.training.config import RunConfig, config_from_dict
from sinkscope.training.loop import lr_at, train

from .conftest import tiny_dict

DROP = {"wall_s"}


def _losses(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows]


def test_run_outputs_and_exact_resume(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    full = train(tiny_cfg, tmp_path / "full")
    assert full is not None
    rows = _losses(tmp_path / "full")
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    last = rows[-1]
    for key in ("loss", "sink_ratio", "bos_attention", "bos_value_norm", "bos_residual_norm", "heads",
                "loss_copy", "loss_bigram", "excess_loss"):
        assert key in last
    assert len(last["bos_attention"]) == 2 and len(last["bos_attention"][0]) == 2  # per layer, per head
    assert set(last["heads"]["L0H0"]) == {"trigger", "non_trigger"}
    assert last["loss"] < rows[0]["loss"]  # it learns
    final = json.loads((tmp_path / "full" / "final.json").read_text())
    assert final["step"] == 12 and final["wall_time_s"] > 0
    assert "attention: softmax" in (tmp_path / "full" / "config.yaml").read_text()

    # killed after step 8 (last checkpoint at 5), then resumed: identical log
    assert train(tiny_cfg, tmp_path / "cut", stop_after=8) is None
    train(tiny_cfg, tmp_path / "cut")
    assert _losses(tmp_path / "cut") == rows


def test_ddp_two_cpu_processes_match_single(corpus: Path, tmp_path: Path) -> None:
    from sinkscope.training.launch import run_local_processes

    d = tiny_dict(corpus, train={"steps": 4, "eval_every": 2, "ckpt_every": 4})
    single = train(config_from_dict(d), tmp_path / "single")
    run_local_processes(d, tmp_path / "ddp", world_size=2)
    ddp = json.loads((tmp_path / "ddp" / "final.json").read_text())
    assert ddp["world_size"] == 2
    for key in ("loss", "train_loss", "sink_ratio"):
        assert ddp[key] == pytest.approx(single.final[key], rel=1e-5, abs=1e-6)
    for a, b in zip(ddp["bos_residual_norm"], single.final["bos_residual_norm"]):
        assert a == pytest.approx(b, rel=1e-4)


def test_checkpoint_corrupt_and_mismatched(tiny_cfg: RunConfig, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_cfg, out, stop_after=5)
    other = config_from_dict(tiny_dict(corpus, model={"d_model": 64}))
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint has 32, config has 64"):
        train(other, out)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(tiny_cfg, out)


def test_optimisers_and_schedule(corpus: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_dict(corpus, optim={"name": "sgd", "lr": 0.1, "warmup_steps": 4,
                                                    "schedule": "cosine"}))
    assert lr_at(0, cfg) == pytest.approx(0.025) and lr_at(3, cfg) == pytest.approx(0.1)
    assert lr_at(11, cfg) < lr_at(5, cfg)
    res = train(cfg, tmp_path / "sgd")
    assert res.rows[-1]["loss"] < res.rows[0]["loss"]


@pytest.mark.parametrize("args,needle", [
    (["model.attention=flash"], "unknown attention kind 'flash'"),
    (["model.n_heads=3"], "n_heads=3 does not divide model.d_model=32"),
    (["model.colour=red"], "unknown key 'model.colour'"),
    (["data.corpus=/no/such/file.txt"], "data file not found: /no/such/file.txt"),
])
def test_cli_errors_are_one_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                 needle: str) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(corpus)))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_cli_trains(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(corpus)))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "o"), "train.steps=3", "model.attention=relu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["step"] == 3
    assert "attention: relu" in (tmp_path / "o" / "config.yaml").read_text()
    # `train run` is the same command; options may come first, as before the subcommands
    assert cli_main(["train", "--fresh", str(cfg), "--out", str(tmp_path / "o"), "train.steps=2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["step"] == 2
    assert cli_main(["train", "run", str(cfg), "--out", str(tmp_path / "o2"), "train.steps=1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["step"] == 1


def test_results_table_runs_missing_and_skips_other_yaml(corpus: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import yaml

    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "tiny-adam.yaml").write_text(yaml.safe_dump(tiny_dict(corpus, train={"steps": 4, "eval_every": 2})))
    (exp / "tiny-sgd.yaml").write_text(yaml.safe_dump(tiny_dict(corpus, train={"steps": 4, "eval_every": 2},
                                                                optim={"name": "sgd", "lr": 0.05})))
    (exp / "other.yaml").write_text("words: [poem]\n")  # not a training config: skipped
    assert cli_main(["train", "table", str(exp), str(tmp_path / "runs"), "--run", "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| tiny-adam | softmax | adamw" in table and "| tiny-sgd | softmax | sgd" in table
    assert "other" not in table and (tmp_path / "runs" / "tiny-sgd" / "final.json").is_file()


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=nan", "optim.lr: expected a finite number"),
    ("optim.lr=inf", "optim.lr: expected a finite number"),
    ("optim.weight_decay=.nan", "optim.weight_decay: expected a finite number"),
    ("optim.betas=[0.9, .inf]", "optim.betas: expected a finite number"),
    ("optim.betas=[0.9, 1.5]", "optim.betas and optim.momentum must be in [0, 1)"),
    ("train.max_minutes=0", "train.max_minutes must be > 0"),
])
def test_non_finite_and_out_of_range_numbers(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             override: str, needle: str) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(corpus)))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "o"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was created


def test_diverging_loss_stops_with_one_line(corpus: Path, tmp_path: Path) -> None:
    from sinkscope.training.loop import DivergedError

    cfg = config_from_dict(tiny_dict(corpus, optim={"lr": 1e30, "grad_clip": None}))
    with pytest.raises(DivergedError, match=r"training diverged: the training loss is (nan|inf) at step \d+ "
                                            r"\(optim.lr=1e\+30\); lower optim.lr") as e:
        train(cfg, tmp_path / "o")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o" / "final.json").exists()
    for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN / Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite {c} written"))


def test_out_is_checked_before_any_work(corpus: Path, tmp_path: Path) -> None:
    from sinkscope.errors import InputError

    bad_data = config_from_dict(tiny_dict(corpus, data={"corpus": str(tmp_path / "missing.txt")}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):  # not 'data file not found': out first
        train(bad_data, tmp_path / "file")
    with pytest.raises(InputError, match="is not a directory"):
        train(bad_data, tmp_path / "file" / "sub")


def test_resume_says_from_which_step(tiny_cfg: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    said: list[str] = []
    train(tiny_cfg, tmp_path / "o", stop_after=7, log=said.append)
    assert said == []
    train(tiny_cfg, tmp_path / "o", log=said.append)
    assert said == [f"resuming {tmp_path / 'o'} from step 5 of 12 (checkpoint.pt)"]
    assert capsys.readouterr().err == ""  # the library prints nothing itself


def test_max_minutes_stops_cleanly_and_resumes(tiny_cfg: RunConfig, corpus: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    full = train(tiny_cfg, tmp_path / "full")
    short = config_from_dict(tiny_dict(corpus, train={"max_minutes": 1e-9}))
    said: list[str] = []
    res = train(short, tmp_path / "o", log=said.append)
    assert res.final["step"] == 1 and res.final["stopped"] == "max_minutes" and res.final["steps_planned"] == 12
    assert "stopped at step 1 of 12" in said[0]
    assert [r["step"] for r in res.rows] == [0, 1]  # evaluated where it stopped
    again = train(tiny_cfg, tmp_path / "o")  # same command without the limit continues
    assert again.final["step"] == 12 and "stopped" not in again.final
    assert again.final["loss"] == pytest.approx(full.final["loss"], abs=1e-6)  # same weights as an uninterrupted run


def test_ctrl_c_exits_130_with_resume_hint(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    import sinkscope.training.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(corpus)))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted; resume with the same command") and "\n" not in err


def test_equal_loss_matches_the_slower_runs_final_row() -> None:
    from sinkscope.training.table import equal_loss

    fast = [{"step": s, "loss": v} for s, v in [(0, 4.0), (100, 2.0), (200, 1.0), (300, 0.9)]]
    slow = [{"step": s, "loss": v} for s, v in [(0, 4.0), (100, 3.0), (200, 1.5)]]
    assert equal_loss(fast, slow) == (fast[2], slow[2])  # fast's first row at <= 1.5, against slow's final row
    assert equal_loss(slow, fast) == (slow[2], fast[2])
    late = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert equal_loss(late, slow) == (late[1], slow[2])  # the first row at or below the other's final loss


def test_results_table_marks_and_skips_long_experiments(corpus: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import yaml

    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "quick.yaml").write_text(yaml.safe_dump(tiny_dict(corpus, train={"steps": 2, "eval_every": 1})))
    (exp / "slow.yaml").write_text(yaml.safe_dump(tiny_dict(corpus, train={"steps": 2, "minutes": 12})))
    assert cli_main(["train", "table", str(exp), str(tmp_path / "runs"), "--run", "--skip-long"]) == 0
    captured = capsys.readouterr()
    assert "skipping slow (long: ~12 min)" in captured.err
    assert "| slow (long, ~12 min) | (not run) |" in captured.out and "| quick | softmax |" in captured.out
    assert not (tmp_path / "runs" / "slow").exists()
    assert cli_main(["train", "table", str(exp), str(tmp_path / "runs"), "--only", "qu*"]) == 0
    assert "slow" not in capsys.readouterr().out


def test_comparison_figures_from_finished_runs(tiny_cfg: RunConfig, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from sinkscope.training.figures import read_figure_specs

    figures = Path(__file__).resolve().parents[3] / "experiments" / "figures.yaml"
    specs = read_figure_specs(figures)
    name = specs["training-peak"].runs[0]
    train(tiny_cfg, tmp_path / "runs" / name)
    capsys.readouterr()
    assert cli_main(["train", "figures", str(tmp_path / "runs"), str(tmp_path / "img"), "--figures", str(figures)]) == 0
    out, err = capsys.readouterr()
    written = tmp_path / "img" / "training-peak.png"
    assert out.split() == [str(written)]  # figures without any finished run are skipped, and said so
    assert "training-slots: no runs yet, skipped" in err
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["train", "figures", str(tmp_path / "runs"), str(tmp_path / "img"), "--figures", str(figures),
                     "--only", "training-nope"]) == 2
    assert "unknown figure(s) training-nope" in capsys.readouterr().err


def test_diagnose_and_profile_commands_read_a_finished_run(tiny_cfg: RunConfig, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from sinkscope.training.diagnose import residual_parts, run_inputs

    run = tmp_path / "run"
    train(tiny_cfg, run)
    capsys.readouterr()
    assert cli_main(["train", "diagnose", "parts", str(run)]) == 0
    got = json.loads(capsys.readouterr().out)
    model, _cfg, batch = run_inputs(run)
    assert got == {"run": str(run), **residual_parts(model, batch, 0)}  # the default layer of parts is 0
    assert cli_main(["train", "profile", str(run), "--samples", "4"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{run}: softmax, attn_bias none: Sink_0 ") and "residual ratio [" in line
    assert cli_main(["train", "diagnose", "nope", str(run)]) == 2
    assert "unknown diagnosis 'nope'; choose from scores, parts, targets" in capsys.readouterr().err
    assert cli_main(["train", "profile", str(run), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err


def test_weight_decay_on_matrices_or_every_parameter(corpus: Path, tmp_path: Path) -> None:
    from sinkscope.models.tinygpt import TinyGPT
    from sinkscope.training.loop import make_optimizer

    for decay, want in (("matrices", {"tok_emb.weight", "layers.0.attn.qkv.weight"}), ("all", None)):
        cfg = config_from_dict(tiny_dict(corpus, model={"vocab_size": 30}, optim={"decay": decay,
                                                                                  "weight_decay": 0.1}))
        model = TinyGPT(cfg.model)
        opt = make_optimizer(model, cfg)
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        if want is None:  # Gu et al.: every parameter, the norms' gains and biases included
            assert names == {n for n, _ in model.named_parameters()}
        else:
            assert want <= names and not any("norm" in n for n in names)


def test_checkpoints_from_before_a_new_setting_still_resume(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import torch

    from sinkscope.training.checkpoint import CHECKPOINT_NAME

    train(tiny_cfg, tmp_path / "o", stop_after=5)
    state = torch.load(tmp_path / "o" / CHECKPOINT_NAME, weights_only=True)
    assert "decay" not in state["fingerprint"]["optim"]  # at its default, optim.decay is left out
    res = train(tiny_cfg, tmp_path / "o")
    assert res.final["step"] == 12
    changed = config_from_dict({**tiny_cfg.to_dict(), "optim": {**tiny_cfg.to_dict()["optim"], "decay": "all"}})
    with pytest.raises(CheckpointError, match="optim.decay: checkpoint has None, config has 'all'"):
        train(changed, tmp_path / "o")
