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
    applies ``device`` and ``dtype`` / ``torch_dtype`` (a torch dtype or its name; ``"auto"``: fp32) and ignores
    the Hugging Face-only ones."""
    import torch

    model, cfg = load_trained(path)
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or torch.float32
    if isinstance(dtype, str):
        dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown dtype {kwargs.get('dtype') or kwargs.get('torch_dtype')!r}", param="dtype")
    model.to(device=kwargs.get("device") or "cpu", dtype=dtype)
    return model, run_tokenizer(cfg)



def main(argv: list[str] | None = None) -> int:
    """``python -m sinkscope.training.run RUN_DIR... [--samples N]``: profile trained runs on held-out
    task sequences and print Sink_0 from the weights used and from the proxy, Sink_* and the per-layer ratios."""
    import argparse

    from sinkscope.profile import profile_sinks
    from sinkscope.training.loop import build_task

    ap = argparse.ArgumentParser(prog="python -m sinkscope.training.run", description=main.__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=32, help="held-out sequences per run (seed 1234, step 0)")
    args = ap.parse_args(argv)
    for run in args.runs:
        model, cfg = load_trained(run)
        batch = build_task(cfg.data).batch(1234, 0, args.samples, cfg.data.seq_len)
        s = profile_sinks(model, batch.idx.tolist()).summary()
        r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
        slot = "" if "sink_ratio_slot" not in s else (
            f" Sink_* {s['sink_ratio_slot']:.3f} (proxy {s['sink_ratio_slot_proxy']:.3f}),"
            f" slot mass by layer {r3(s['learned_sink_mass_by_layer'])};")
        print(f"{run}: {cfg.model.attention}, attn_bias {cfg.model.attn_bias}: Sink_0 {s['sink_ratio']:.3f}"
              f" (proxy {s['sink_ratio_proxy']:.3f}); alpha_0 by layer {r3(s['attention_on_first_by_layer'])}"
              f" (proxy {r3(s['attention_on_first_by_layer_proxy'])});{slot} value ratio"
              f" {r3(s['value_ratio_first_by_layer'])}, residual ratio {r3(s['residual_ratio_first_by_layer'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
