"""Entry point: register every command module on the shared app."""

from __future__ import annotations

import importlib

from prunekit.cli.app import app

COMMAND_MODULES = ["prune", "quantize", "evaluate", "compare", "hub", "sweep", "demo"]

for _name in COMMAND_MODULES:  # each registers its command on ``app``
    importlib.import_module(f"prunekit.cli.{_name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
