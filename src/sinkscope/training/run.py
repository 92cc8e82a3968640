"""A finished (or checkpointed) ``sinkscope train`` run directory opened as a model: `load_trained`, and the
``tinygpt_run`` artefact kind, so that ``sinkscope.load_model(RUN_DIR)`` and ``sinkscope scan --model RUN_DIR``
profile a trained tinygpt like any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sinkscope.errors import InputError
from sinkscope.models.tinygpt import TinyGPT
from sinkscope.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from sinkscope.training.config import RunConfig, load_config


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's ``config.yaml`` and ``checkpoint.pt``."""
    return (path / "config.yaml").is_file() and (path / CHECKPOINT_NAME).is_file()


def load_trained(run_dir: str | Path) -> tuple[TinyGPT, RunConfig]:
    """The trained model of a ``sinkscope train`` run directory (its ``config.yaml`` and ``checkpoint.pt``).

    Returns:
        ``(model, run_config)``: the TinyGPT in eval mode on the CPU, and the run's resolved `RunConfig`
        (``run_config.data`` rebuilds the task's inputs, see `sinkscope.training.loop.build_task`).
    Raises:
        InputError: no ``config.yaml`` or ``checkpoint.pt`` in ``run_dir``; CheckpointError: a checkpoint that
        is unreadable, holds pickled objects, or is from another config.
    """
    run = Path(run_dir)
    for name in ("config.yaml", CHECKPOINT_NAME):
        if not (run / name).is_file():
            raise InputError(f"{run} is not a sinkscope train run directory (no {name})")
    cfg = load_config(run / "config.yaml")
    model = TinyGPT(cfg.model)
    model.load_state_dict(load_checkpoint(run / CHECKPOINT_NAME, cfg.state_dict_fingerprint())["model"])
    return model.eval(), cfg


class RunTokenizer:
    """The token ids a run was trained on, behind the few tokenizer calls sinkscope's inputs make.

    Bigram-Backcopy runs read characters of the task's alphabet (others are dropped), byte-level text runs read
    UTF-8 bytes; both put the run's BOS id first when ``add_special_tokens`` (as training does).
    """

    def __init__(self, vocab: list[str], bos_id: int, encode: Any) -> None:
        self.vocab, self.bos_token_id, self._encode = vocab, bos_id, encode
        self.eos_token_id = self.pad_token_id = None
        self.eos_token = self.pad_token = None
        self.all_special_ids = [bos_id]
        self.chat_template = None

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = list(self._encode(text))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.vocab[i]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == self.bos_token_id))


def run_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer of a run's data (see `RunTokenizer`; a SmolLM2-tokenised text run gets SmolLM2's)."""
    from sinkscope.training.loop import build_task

    d = cfg.data
    if d.task == "bigram_backcopy":
        task = build_task(d)
        index = {c: i for i, c in enumerate(task.chars)}
        return RunTokenizer([*task.chars, "<bos>"], task.bos_id,
                            lambda t: (index[c] for c in t if c in index))
    if d.tokenizer == "bytes":
        vocab = [bytes([b]).decode("latin-1") for b in range(256)] + ["<bos>"]
        return RunTokenizer(vocab, 256, lambda t: t.encode("utf-8"))
    from sinkscope.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m")


def load_run_model(path: str | Path, **kwargs: Any) -> tuple[TinyGPT, Any]:
    """Loader of the ``tinygpt_run`` artefact: ``(model, tokenizer)``. Of `load_model`'s keyword arguments it
    applies ``device`` (`sinkscope.devices.single_device`: ``auto`` is CUDA when available, else the CPU) and
    ``dtype`` / ``torch_dtype`` (`sinkscope.devices.parse_dtype`; ``"auto"``: the checkpoint's dtype, float32)
    and ignores the Hugging Face-only ones."""
    from sinkscope.devices import parse_dtype, single_device

    model, cfg = load_trained(path)
    parsed = parse_dtype(kwargs.get("dtype") or kwargs.get("torch_dtype"))
    # parse_dtype's only string is "auto": the checkpoint's dtype (training writes float32)
    dtype = next(iter(model.state_dict().values())).dtype if isinstance(parsed, str) else parsed
    model.to(device=single_device(kwargs.get("device") or "cpu"), dtype=dtype)
    return model, run_tokenizer(cfg)



def profile_run(run_dir: str | Path, samples: int = 32) -> dict[str, Any]:
    """`sinkscope.profile.profile_sinks` of a trained run on ``samples`` task sequences (seed 1234, step 0):
    the profile's ``summary()`` plus the run's ``attention`` and ``attn_bias`` (``sinkscope train profile``).

    Raises:
        InputError: not a run directory, ``samples`` < 1; CheckpointError: an unreadable or foreign checkpoint.
    """
    from sinkscope.profile import profile_sinks
    from sinkscope.training.loop import build_task

    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}", param="samples")
    model, cfg = load_trained(run_dir)
    batch = build_task(cfg.data).batch(1234, 0, samples, cfg.data.seq_len)
    summary = profile_sinks(model, batch.idx.tolist()).summary()
    return {"run": str(run_dir), "attention": cfg.model.attention, "attn_bias": cfg.model.attn_bias, **summary}
