"""What every `fleet` command shares, on either side: a problem the user can fix (a `FleetError`,
an option out of range, an unknown option) is one line on stderr and exit code 2; Ctrl-C is one
line and exit code 130; nothing prints a traceback with local variables (they can hold secrets,
and they made a wrong `--out` 700 lines long); `fleet --version`."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from typing import Annotated, NoReturn

import click
import typer
from typer.core import TyperGroup

from skip2fleet.shared.errors import FleetError, Interrupted

INTERRUPTED = 130  # the exit code of Ctrl-C, as a shell reports a process SIGINT ended


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with `message` as one line on stderr (an error's, or Ctrl-C's)."""
    label = "" if code == INTERRUPTED else f"{click.style('error:', fg='red', bold=True)} "
    click.echo(label + message, err=True)
    raise typer.Exit(code)


def _usage(exc: click.UsageError) -> NoReturn:
    """Click's usage error (a bad option value, an unknown option or command) as one line,
    instead of typer's box with the usage line around it."""
    where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
    fail(f"{exc.format_message().rstrip('.')}{where}", exc.exit_code)


def unwrapped(text: str | None) -> str | None:
    """A docstring with each paragraph (and list item) on one line, for the terminal to wrap:
    typer's help keeps a docstring's line breaks, which broke sentences in the middle."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and not line.startswith(("- ", "* ")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _unwrap_all(command: click.Command) -> None:
    command.help = unwrapped(command.help)
    for sub in getattr(command, "commands", {}).values():
        _unwrap_all(sub)


class FleetGroup(TyperGroup):
    """A `fleet` command tree whose errors follow the module's rules."""

    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        _unwrap_all(self)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:  # the top-level options (`fleet --bogus`)
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            _usage(exc)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # a command's options, parsed here
            _usage(exc)
        except Interrupted as exc:
            fail(str(exc), INTERRUPTED)
        except FleetError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"fleet (skip2fleet) {version('skip2fleet')}")
        raise typer.Exit()


def fleet_app(help_text: str) -> typer.Typer:
    """A `fleet` command tree: the rules above, `--version`, no shell-completion options."""
    app = typer.Typer(
        cls=FleetGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        pretty_exceptions_show_locals=False,
        help=help_text,
    )

    @app.callback()
    def options(
        _: Annotated[
            bool,
            typer.Option(
                "--version", callback=_version, is_eager=True, help="Say the installed version."
            ),
        ] = False,
    ) -> None:
        pass

    return app
