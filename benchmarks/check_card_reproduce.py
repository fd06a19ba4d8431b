"""Run a model card's Reproduce section as written, in a fresh virtual environment (issue 30 §3).

The card of CHECKPOINT is rendered as `prunekit push` would render it. Its Reproduce block is run line by line
with bash in a fresh clone of this prunekit checkout (the block's first line makes `.venv` there and installs
prunekit the way the README does), with `OUT` left as the card writes it. Then the checkpoint it made is compared
with CHECKPOINT: the same run identity, and whether the weights are byte-identical.

    python benchmarks/check_card_reproduce.py prunekit-demo/checkpoints/wanda-sw

Prints each command with its exit status and time, then the comparison. Exit 0 when every command succeeded and
the run identity matches. It installs torch and prunekit's dependencies (minutes; the package index is needed);
nothing is left behind unless --keep is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reproduce_lines(card: str) -> list[str]:
    section = card.split("## Reproduce", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1).splitlines()


def digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.glob("*.safetensors"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a prunekit checkpoint whose card to reproduce")
    parser.add_argument("--keep", action="store_true", help="keep the clone, its .venv and OUT")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from prunekit.hub import render_model_card

    record = json.loads((args.checkpoint / "prunekit.json").read_text())
    lines = reproduce_lines(render_model_card(record, repo_id="org/reproduce-check"))
    work = Path(tempfile.mkdtemp(prefix="card-reproduce-"))
    clone = work / "prunekit"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    ok = True
    try:
        for line in lines:  # each line in its own bash, in the clone's .venv once the first line has made it
            command = (". .venv/bin/activate && " if (clone / ".venv").exists() else "") + line
            started = time.perf_counter()
            done = subprocess.run(["bash", "-ec", command], cwd=clone, capture_output=True, text=True)
            print(f"rc {done.returncode:3d}  {time.perf_counter() - started:7.1f} s  {line}")
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
                ok = False
                break
        if ok:
            made = clone / "OUT"
            again = json.loads((made / "prunekit.json").read_text())
            same_id = again["run_id"] == record["run_id"]
            same_bytes = digest(made) == digest(args.checkpoint)
            print(f"run identity the same: {'yes' if same_id else 'no'} ({again['run_id']} vs {record['run_id']})")
            print(f"safetensors byte-identical: {'yes' if same_bytes else 'no (another machine or library build)'}")
            ok = same_id
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
