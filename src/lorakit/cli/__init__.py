"""The ``lorakit`` command line: a thin layer over the library. Commands are imported on first use."""

from __future__ import annotations

import importlib
import signal
import sys
import threading

import click

from ..errors import LorakitError

__all__ = ["main"]

# command name -> "module:attribute" (a click.Command)
COMMANDS = {
    "inspect": "lorakit.cli.inspect_cmd:inspect_cmd",
    "convert": "lorakit.cli.inspect_cmd:convert_cmd",
    "generate": "lorakit.cli.generate_cmd:generate_cmd",
    "extract": "lorakit.cli.tools_cmd:extract_cmd",
    "merge": "lorakit.cli.tools_cmd:merge_cmd",
    "compose": "lorakit.cli.tools_cmd:compose_cmd",
    "resize": "lorakit.cli.tools_cmd:resize_cmd",
    "validate": "lorakit.cli.tools_cmd:validate_cmd",
    "split": "lorakit.cli.tools_cmd:split_cmd",
    "serve": "lorakit.cli.serve_cmd:serve_cmd",
    "train": "lorakit.cli.train_cmd:train_cmd",
    "quantize": "lorakit.cli.quantize_cmd:quantize_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorakit")
def cli() -> None:
    """lorakit: LoRA files for diffusion models — inspect, convert, apply, generate, train, extract, merge,
    compose, resize, validate, split, quantize and serve."""


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every ``atomic_output`` removes its temp file on the way out (a
    second SIGTERM is ignored so it cannot cut that cleanup short; ``main`` restores the handler)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError (no space left, permission denied, ...): the path, then the reason."""
    reason = exc.strerror or str(exc)
    return f"Error: {exc.filename}: {reason}" if exc.filename else f"Error: {reason}"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: library errors become one clear sentence and exit code 1, no traceback. SIGTERM
    exits with 143 after removing any partial output."""
    from .._quiet import silence_known_noise

    silence_known_noise()  # dependencies' known start-up noise only; real warnings still show
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LorakitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a write that failed (ENOSPC, EACCES) or a file that vanished: one line, no traceback
        click.echo(_os_error_line(exc), err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
