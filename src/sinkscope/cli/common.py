"""What every model-loading CLI command shares: --model, --device, --dtype, --revision, --trust-remote-code, the
output directory and progress shown per phase.

`ModelOptions` checks the spec and the options when built, before the model loads (a typo is refused at once),
then `ModelOptions.load` loads through `sinkscope.load_model`. ``--device auto`` places a model across the
available devices with accelerate's ``device_map="auto"`` (the profiler keeps each statistic on its layer's
device); ``--dtype auto`` is the checkpoint's dtype (`sinkscope.devices`).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from sinkscope.errors import InputError
from sinkscope.io import LOCK_NAME, OutputLock, check_output_dir
from sinkscope.models.load import DEFAULT_MODEL, resolve_model_spec
from sinkscope.progress import ProgressReporter

MODEL_OPTION = typer.Option(DEFAULT_MODEL, "--model", "-m",
                            help="alias, HF directory, .gguf file, saved patch directory or hub id")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps, or auto (the accelerators this machine "
                                                     "has, spread with device_map='auto', else the CPU)")
DTYPE_OPTION = typer.Option("float32", "--dtype", help="float32 (default: exact metrics), bfloat16, float16 or "
                                                       "auto (the checkpoint's dtype)")
REVISION_OPTION = typer.Option(None, "--revision", help="hub models: branch, tag or commit (the resolved commit "
                                                        "is recorded in the results)")
TRUST_OPTION = typer.Option(False, "--trust-remote-code", help="run the model repository's own code: only for "
                                                               "code you trust")
THREADS_OPTION = typer.Option(None, "--threads", help="torch CPU threads")


def check_threads(threads: int | None) -> None:
    """``--threads``: None (torch's default) or at least 1; a one-line InputError otherwise."""
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}", param="threads")


def shown_path(path: str | Path) -> str:
    """A path as the CLI prints it: relative to the working directory when it lies inside it (``out/report``),
    else absolute."""
    p = Path(path).absolute()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def output_dir(out: str) -> Path:
    """``--out`` checked before any work (`sinkscope.io.check_output_dir`): an empty string is refused rather than
    read as the current directory."""
    return check_output_dir(out)


@contextmanager
def locked_output(out_dir: Path) -> Iterator[Path]:
    """Hold `sinkscope.io.OutputLock` on ``out_dir`` for the whole job, so a second job on the same ``--out`` is
    refused in one line; a job that fails before writing anything leaves no directory behind that it made."""
    made = not out_dir.exists()
    try:
        with OutputLock(out_dir):
            yield out_dir
    except BaseException:
        if made and out_dir.is_dir() and [p.name for p in out_dir.iterdir()] == [LOCK_NAME]:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


@dataclass(frozen=True)
class ModelOptions:
    """The model options of a command, checked when built (cheap: before torch or transformers load the model).

    Raises:
        InputError / ModelLoadError: an unknown spec, device or dtype, or ``--revision`` on a local model.
    """

    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from sinkscope.devices import parse_device, parse_dtype  # imports torch: only once the spec is known

        source = resolve_model_spec(self.model)
        parse_dtype(self.dtype, param="--dtype")
        if self.revision is not None and source.kind not in ("hub", "manifest"):
            raise InputError(f"--revision applies to hub models; {self.model!r} is a local {source.kind}")
        parse_device(self.device, param="--device")

    def load(self) -> tuple[Any, Any, float]:
        """``(model, tokenizer, seconds)`` through `sinkscope.load_model`, its phases shown on standard error."""
        from sinkscope.devices import placement_kwargs
        from sinkscope.models.load import load_model

        extra: dict[str, Any] = {"revision": self.revision} if self.revision is not None else {}
        def phase(done: int, total: int | None, what: str) -> None:  # the slow phase (dequantising) is told
            if total is not None and done < total:
                print(what, file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        model, tokenizer = load_model(self.model, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                                      progress=phase, **placement_kwargs(self.device), **extra)
        return model, tokenizer, time.perf_counter() - t0


class PhaseProgress:
    """A `sinkscope.progress.ProgressCallback` for work in named phases (report sections, stream policies): a
    new `ProgressReporter` labelled with ``what`` whenever ``what`` changes, so each phase has its own count,
    rate and time left. Use as a context manager."""

    def __init__(self, unit: str = "", every_s: float = 10.0) -> None:
        self.unit = unit
        self.every_s = every_s
        self._what: str | None = None
        self._reporter: ProgressReporter | None = None

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close(*exc)

    def _close(self, *exc: object) -> None:
        if self._reporter is not None:
            self._reporter.__exit__(*exc)
            self._reporter = None

    def __call__(self, done: int, total: int | None = None, what: str = "") -> None:
        if what != self._what or self._reporter is None:
            self._close(None, None, None)
            self._what = what
            self._reporter = ProgressReporter(what or "working", unit=self.unit, every_s=self.every_s).__enter__()
        self._reporter(done, total)


def load_cli_model(model: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)``: `ModelOptions` checked, then loaded (for commands that build no options object)."""
    return ModelOptions(model, device, dtype, revision, trust_remote_code).load()[:2]
