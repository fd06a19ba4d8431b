"""A light CLI (issue 26 §5): `prunekit --help`, `--version`, every command's `--help`, and the Hub-only
commands (push, pull) import neither torch nor transformers. Each is run in a fresh interpreter, which
reports the heavy modules it ended with in ``sys.modules``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

PROBE = """
import json, sys
heavy = {heavy!r}
code = 0
try:
    {body}
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
print("\\nPROBE " + json.dumps({{"code": code, "heavy": [m for m in heavy if m in sys.modules]}}))
"""


def probe(body: str, env: dict | None = None, timeout: float = 120) -> dict:
    """Run ``body`` in a fresh interpreter; its exit code and the heavy modules it imported."""
    import os

    code = PROBE.format(heavy=HEAVY, body=body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, done.stdout + done.stderr
    return json.loads(line[len("PROBE "):]) | {"output": done.stdout + done.stderr}


def cli(*args: str) -> str:
    return f"from prunekit.cli.main import main; main({list(args)!r})"


def test_importing_the_cli_loads_no_torch():
    result = probe("import prunekit.cli.main")
    assert result["heavy"] == [], result


def command_names() -> list[str]:
    from prunekit.cli.main import app

    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[name, "--help"] for name in command_names()],
                         ids=lambda a: " ".join(a))
def test_help_and_version_load_no_torch(args):
    result = probe(cli(*args))
    assert result["code"] == 0, result["output"]
    assert result["heavy"] == [], result
    if args == ["--version"]:
        from prunekit import __version__

        assert f"prunekit {__version__}" in result["output"]


def test_push_and_pull_load_no_torch(tiny_llama, tmp_path):
    """push, pull and find run to their first Hub request (a closed local port answers at once) without torch: push has read
    the record and results and rendered the card by then."""
    import prunekit

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    checkpoint = tmp_path / "ckpt"
    prunekit.prune(str(tiny_llama), "magnitude", output=prunekit.OutputSpec(checkpoint),
                   engine=prunekit.EngineSpec("cpu"), progress=False)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_light_cli_test"}
    for args in (["pull", "org/x", "--out", str(tmp_path / "pulled")], ["pull", "org/x"],
                 ["push", str(checkpoint), "--repo-id", "org/x"], ["find", "--base", "org/base", "--lang", "sw"]):
        result = probe(cli(*args), env=env)
        assert result["code"] == 2, result["output"]
        assert "error: cannot reach the Hub" in result["output"], result["output"]
        assert result["heavy"] == [], (args, result)
