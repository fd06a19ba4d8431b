"""Entry point: register every command module on the shared app."""

from __future__ import annotations

import importlib

from prunekit.cli.app import app

COMMAND_MODULES = ["prune", "quantize", "evaluate", "compare", "hub", "find", "sweep", "report", "demo"]

for _name in COMMAND_MODULES:  # each registers its command on ``app``
    importlib.import_module(f"prunekit.cli.{_name}")


def main(argv: list[str] | None = None) -> None:
    """``--debug`` is accepted anywhere before a lone ``--``: ``prunekit --debug push …`` and ``prunekit push … --debug``."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[1:end]:  # after the command: the root callback only sees it before
        args = [a for i, a in enumerate(args) if not (a == "--debug" and 0 < i < end)]
        args.insert(0, "--debug")
    app(args=args, prog_name="prunekit")


if __name__ == "__main__":
    main()
