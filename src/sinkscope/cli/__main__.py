"""Entry point of the `sinkscope` CLI; each subcommand lives in its own module of this package."""

from __future__ import annotations

import importlib
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

@app.callback()
def _root() -> None:
    """Find, measure, explain and fix attention sinks and extreme tokens in transformer LMs."""


#: (module under sinkscope.cli, name, kind): kind "command" registers the module's `command`
#: function; kind "group" adds the module's `app` (a Typer) as a command group.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("scan", "scan", "command"),
    ("repeat", "repeat", "group"),
    ("train", "train", "command"),
    ("stream", "stream", "group"),
    ("report", "report", "command"),
]


def _register() -> None:
    for module_name, name, kind in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"sinkscope.cli.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"sinkscope.cli.{module_name}":
                continue  # subcommand not built yet
            raise
        if kind == "group":
            app.add_typer(module.app, name=name)
        else:
            app.command(name)(module.command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (`error: ...`) and exit with status 2."""
    try:
        result = app(args=argv, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except SinkscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # click's (typer-vendored) usage errors: one line, no usage box
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help())  # type: ignore[attr-defined]
            return 0
        if type(e).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            return 130
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message()}", file=sys.stderr)
            return 2
        raise
    if isinstance(result, int) and result:
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
