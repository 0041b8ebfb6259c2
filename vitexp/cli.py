"""The command line: a thin Typer layer over functions a notebook can call.

Every command turns bad input into one line on stderr and exit code 2
(vitexp.errors.UserError); nothing here computes anything itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from vitexp.errors import UserError

app = typer.Typer(
    name="vitexp",
    help="Reproduce the inductive-bias studies of ViT (data-size scaling) and "
    "Early Convolutions (conv-stem stability): train, sweep, plot.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


# --- models (issue 2) ---------------------------------------------------------

# --- train (issue 3) ----------------------------------------------------------

# --- studies (issue 4) --------------------------------------------------------

# --- plots and report (issue 5) ----------------------------------------------

# --- bench (issue 6) ----------------------------------------------------------

# --- launch (issue 7) ---------------------------------------------------------

# --- doctor (issue 8) ---------------------------------------------------------


def main() -> None:
    """Entry point: run the app, turning UserError into one line and exit 2."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
