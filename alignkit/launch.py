"""The ``alignkit`` command's entry point: chooses how OpenMP threads wait before torch loads, then runs
:func:`alignkit.cli.main` (``python -m alignkit`` and ``accelerate launch -m alignkit`` come here too)."""

from __future__ import annotations

from alignkit.cpu_threads import prepare_openmp


def main() -> int:
    """Console entry: :func:`alignkit.cpu_threads.prepare_openmp`, then the command line."""
    prepare_openmp()
    from alignkit.cli import main as cli_main

    return cli_main()
