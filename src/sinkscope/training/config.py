"""Training run configuration: frozen dataclasses mapped 1:1 onto YAML, with ``base:`` files and dotted overrides.

A YAML file has the blocks ``model`` (:class:`~sinkscope.models.tinygpt.TinyGPTConfig`), ``data``
(:class:`DataConfig`), ``optim`` (:class:`OptimConfig`) and ``train`` (:class:`TrainConfig`), plus an optional
``base: path/to/base.yaml`` (relative to the file) whose values it overrides. Unknown keys are refused.

>>> cfg = config_from_dict({"model": {"d_model": 32, "n_heads": 2}}, ["optim.lr=1e-3", "model.attention=relu"])
>>> cfg.model.attention, cfg.optim.lr, cfg.model.d_model
('relu', 0.001, 32)
>>> config_from_dict({"model": {"atention": "relu"}})  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
...
sinkscope.training.config.ConfigError: unknown key 'model.atention' (did you mean 'model.attention'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sinkscope.errors import InputError
from sinkscope.io import read_text_file
from sinkscope.models.tinygpt import TinyGPTConfig

TASK_NAMES = ("bigram_backcopy", "text")


class ConfigError(InputError):
    """A training config is invalid (unknown key, wrong type, bad value, missing file)."""


@dataclass(frozen=True)
class DataConfig:
    """Task and data switches.

    Attributes:
        task: bigram_backcopy | text.
        seq_len: tokens the model sees per sequence, BOS included when there is one.
        batch_size: global batch (split over DDP ranks); ``eval_batch_size``: sequences per evaluation.
        corpus: BB: a text file whose character bigrams define the task. Text LM: a text file, a directory
            (every text file under it, recursively), a glob (``src/**/*.py``) or ``python-stdlib`` (the running
            Python's standard library, ``**/*.py``); several files are deduplicated by content and held out
            whole files at a time (:mod:`sinkscope.tasks.text_lm`). Relative paths are resolved against the
            working directory. null: the shipped WikiText-2 validation text (`sinkscope.corpora`).
        n_chars, n_triggers: BB alphabet size (most frequent characters) and number of trigger characters.
        tokenizer: text LM tokenizer, ``bytes`` (vocab 257, BOS 256) or ``smollm2`` (embedded SmolLM2's).
        bos: sequences start with a BOS token. Text LM: chunks with/without BOS. BB: without BOS the first
            character is drawn from the first-character distribution at position 0 (Gu et al. train without
            BOS; no token is then a free sink slot).
        fixed_token_pos / fixed_token_id: put a fixed token at this position (Gu et al.'s data switch).
        random_token_pos: put a uniformly random token at this position.
        prefix_len: prefix LM: the first ``prefix_len`` positions attend bidirectionally and carry no loss.
        eval_split: share of the text held out for evaluation (the end of one file; whole files of several).
    """

    task: str = "bigram_backcopy"
    seq_len: int = 128
    batch_size: int = 64
    eval_batch_size: int = 64
    corpus: str | None = None
    n_chars: int = 65
    n_triggers: int = 3
    tokenizer: str = "bytes"
    bos: bool = True
    fixed_token_pos: int | None = None
    fixed_token_id: int = 0
    random_token_pos: int | None = None
    prefix_len: int = 0
    eval_split: float = 0.05

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise ConfigError(f"data.task: unknown task {self.task!r} (choose from {', '.join(TASK_NAMES)})")
        if self.tokenizer not in ("bytes", "smollm2"):
            raise ConfigError(f"data.tokenizer: unknown tokenizer {self.tokenizer!r} (choose from bytes, smollm2)")
        for name in ("seq_len", "batch_size", "eval_batch_size", "n_chars", "n_triggers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_triggers >= self.n_chars:
            raise ConfigError(f"data.n_triggers={self.n_triggers} must be < data.n_chars={self.n_chars}")
        for name in ("fixed_token_pos", "random_token_pos"):
            pos = getattr(self, name)
            if pos is not None and not 0 <= pos < self.seq_len:
                raise ConfigError(f"data.{name}={pos} is outside the sequence (seq_len {self.seq_len})")
        if not 0 <= self.prefix_len < self.seq_len:
            raise ConfigError(f"data.prefix_len={self.prefix_len} must be in [0, seq_len)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: AdamW or SGD with momentum; linear warm-up then constant or cosine lr.

    Attributes:
        decay: which parameters ``weight_decay`` applies to: ``matrices`` (weight matrices and embeddings; not
            norms, biases or bias slots: nanoGPT's habit and this lab's default) or ``all`` (every parameter, as
            Gu et al.'s AdamW does; their sweep of weight decay 0 .. 5 is over every parameter).
    """

    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    decay: str = "matrices"

    def __post_init__(self) -> None:
        if self.decay not in ("matrices", "all"):
            raise ConfigError(f"optim.decay: unknown choice {self.decay!r} (choose from matrices, all)")
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"optim.name: unknown optimiser {self.name!r} (choose from adamw, sgd)")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule: unknown schedule {self.schedule!r} (choose from constant, cosine)")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError("optim.weight_decay must be >= 0 and optim.grad_clip > 0 (or null)")
        if not all(0 <= b < 1 for b in self.betas) or not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.betas and optim.momentum must be in [0, 1), got {list(self.betas)}, "
                              f"{self.momentum}")


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings: steps, seeds, evaluation/checkpoint cadence, metric thresholds, device.

    Attributes:
        max_minutes: stop after this many wall-clock minutes of this session even if ``steps`` is not reached;
            the run then evaluates, checkpoints and writes ``final.json`` at the step it got to (``stopped``:
            ``max_minutes``). Rerunning the same command resumes from there. null: no limit.
        minutes: the expected wall time of the whole run on one CPU core (informational: the results table
            marks runs of 5 minutes or more as long and ``--skip-long`` leaves them out).
        dormant_threshold: a head is ``dormant`` for a class of queries when they put more than this share of
            their (row-normalised) attention on the first token and the sink slot: 0.89 is Guo et al.'s
            criterion (their code, on non-trigger queries); 0.5 was this lab's default before issue 19.
    """

    steps: int = 1000
    seed: int = 0
    eval_every: int = 100
    ckpt_every: int = 500
    eps: float = 0.3
    dormant_threshold: float = 0.89
    device: str = "auto"
    threads: int | None = None
    plots: bool = True
    max_minutes: float | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0 or null, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1 or null, got {self.threads}")


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    model: TinyGPTConfig = field(default_factory=TinyGPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def state_dict_fingerprint(self) -> dict[str, Any]:
        """The parts of the config a checkpoint's tensors depend on (everything but loop cadence/device)."""
        d = self.to_dict()
        d["train"] = {"seed": d["train"]["seed"]}
        for section, key, default in ADDED_SINCE_FORMAT_1:  # at their defaults: checkpoints from before still match
            if d[section].get(key) == default:
                del d[section][key]
        return d


#: settings added after checkpoints of format 1 were first written, with the default that equals the old behaviour
ADDED_SINCE_FORMAT_1: tuple[tuple[str, str, Any], ...] = (("optim", "decay", "matrices"),)

SECTIONS: dict[str, type] = {"model": TinyGPTConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # PyYAML reads "1e-3" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .nan/.inf, or "nan"/"inf" typed on the command line
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{section}.{key}'{hint}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except InputError as e:
        raise ConfigError(str(e)) from None


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {dotted!r}: expected section.key=value (e.g. model.attention=relu)")
    d.setdefault(parts[0], {})
    if not isinstance(d[parts[0]], dict):
        raise ConfigError(f"override {dotted!r}: {parts[0]} is not a section")
    d[parts[0]][parts[1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.attention=relu"`` -> ``("model.attention", "relu")``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_from_dict(d: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from nested dicts plus dotted ``key=value`` overrides."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for text in overrides or []:
        _set_dotted(d, *parse_override(text))
    for key in d:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown section '{key}'{hint}; sections are {', '.join(SECTIONS)}")
    built = {name: _build(name, cls, d.get(name) or {}) for name, cls in SECTIONS.items()}
    return RunConfig(**built)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following ``base:`` links (relative to each file); returns the merged dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config {path}: 'base' links form a cycle")
    try:
        text = read_text_file(path, "config")  # not UTF-8 text, or blank: one line
        d = yaml.safe_load(text)
    except InputError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"config {path} is not valid YAML: {first}") from None
    if d is None or d == {}:  # only comments: training the built-in defaults silently is never meant
        raise ConfigError(f"config is empty: {path} (give at least one setting, e.g. train.steps)")
    if not isinstance(d, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    base = d.pop("base", None)
    if base is None:
        return d
    return _merge(read_yaml_tree(path.parent / base, (*_seen, path.resolve())), d)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (with ``base:``) and apply dotted overrides."""
    return config_from_dict(read_yaml_tree(Path(path)), overrides)
