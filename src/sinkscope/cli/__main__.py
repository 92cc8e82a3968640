"""Entry point of the `sinkscope` CLI; each subcommand lives in its own module of this package."""

from __future__ import annotations

import importlib
import re
import sys

import typer

from sinkscope.errors import SinkscopeError

app = typer.Typer(
    name="sinkscope",
    help="Find, measure, explain and fix attention sinks and extreme tokens in transformer LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        from sinkscope import __version__

        print(f"sinkscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Find, measure, explain and fix attention sinks and extreme tokens in transformer LMs."""


#: (module under sinkscope.cli, name, kind): kind "command" registers the module's `command`
#: function; kind "group" adds the module's `app` (a Typer) as a command group.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("scan", "scan", "command"),
    ("repeat", "repeat", "group"),
    ("train", "train", "group"),
    ("stream", "stream", "group"),
    ("report", "report", "command"),
    ("kv", "kv", "group"),
]


def _register() -> None:
    for module_name, name, kind in SUBCOMMANDS:
        module = importlib.import_module(f"sinkscope.cli.{module_name}")
        if kind == "group":
            app.add_typer(module.app, name=name)
        else:
            app.command(name)(module.command)


_register()


#: library parameter -> CLI flag, where the flag is not ``--`` + the parameter with dashes
FLAGS: dict[str, str] = {"n_sink": "--sinks", "n_tokens": "--tokens", "prefill_chunk_size": "--prefill-chunk",
                         "circuit_per_layer": "--circuit-neurons", "chunk_bytes": "--chunk-bytes"}


def user_message(e: SinkscopeError) -> str:
    """The error's message with the library parameter it names (``e.param``) shown as the CLI flag."""
    msg = str(e)
    if e.param:
        flag = FLAGS.get(e.param, "--" + e.param.replace("_", "-"))
        msg = re.sub(rf"(?<![\w-]){re.escape(e.param)}\b", flag, msg)
    return msg


#: commands that continue where an interrupted run stopped when run again with the same --out
RESUMABLE = ("train", "repeat scan", "repeat evaluate")
#: commands whose documented way to stop is Ctrl-C: stopping is not an error
STOPPED_BY_CTRL_C = ("stream generate",)


def interrupted_message(argv: list[str] | None) -> str | None:
    """What to say when Ctrl-C stops the command that ``argv`` names (None: nothing, it is how it stops)."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")][:2]
    command = next((c for c in (*RESUMABLE, *STOPPED_BY_CTRL_C) if c.split() == words[:len(c.split())]), None)
    if command in STOPPED_BY_CTRL_C:
        return None
    if command in RESUMABLE:
        return (f"interrupted; resume with the same command ({command} continues where it stopped; nothing "
                "half-written is left behind)")
    return "interrupted; nothing half-written is left behind (run the command again to start over)"


def _interrupted(argv: list[str] | None) -> int:
    message = interrupted_message(argv)
    if message is not None:
        print(message, file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (`error: ...`) and exit with status 2."""
    try:
        result = app(args=argv, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except SinkscopeError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(argv)
    except Exception as e:  # click's (typer-vendored) usage errors: one line, no usage box
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help())  # type: ignore[attr-defined]
            return 0
        if type(e).__name__ == "Abort":  # click turns Ctrl-C inside a command into Abort
            return _interrupted(argv)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message()}", file=sys.stderr)
            return 2
        raise
    if result == 130:  # typer turns Ctrl-C inside a command (click's Abort) into this return code
        return _interrupted(argv)
    if isinstance(result, int) and result:
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
