"""Entry point: register every command module on the shared app."""

from __future__ import annotations

import importlib

from prunekit.cli.app import app

COMMAND_MODULES = ["prune", "quantize", "evaluate", "compare", "hub", "sweep", "report", "demo"]

for _name in COMMAND_MODULES:
    try:
        importlib.import_module(f"prunekit.cli.{_name}")
    except ModuleNotFoundError as err:  # a command module not yet present in this checkout
        if err.name != f"prunekit.cli.{_name}":
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
