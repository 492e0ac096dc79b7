"""The ``meunet`` command-line program: thin wrappers over the Python API.

Every command turns :class:`meunet.errors.InputError` into one ``error: <path>: <problem>`` line on stderr
and exit status 2. Commands live here; the work lives in the stage modules (``meunet.io``, ``meunet.infer``,
...), which the commands import lazily so that ``meunet --help`` stays fast.
"""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from meunet import __version__
from meunet.errors import InputError


class _Group(TyperGroup):
    """Typer group that reports :class:`InputError` as one line and exit status 2."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except InputError as exc:
            typer.echo(f"error: {exc.path}: {exc.message}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="meunet",
    cls=_Group,
    help="Memory-efficient segmentation of very large volumetric microCT images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Memory-efficient segmentation of very large volumetric microCT images."""


@app.command()
def version() -> None:
    """Print the meunet and torch versions."""
    import torch

    typer.echo(f"meunet {__version__} (torch {torch.__version__})")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
