"""Resume at the layer (issue 25 §6, issue 26 §1): a streamed prune killed with kill -9 two thirds of the way
through, then the same command again.

On a synthetic Llama-3-8B-shaped bf16 checkpoint (``benchmarks/bench_memory.py``'s ``generate``; default the
8-layer one generated under --root), three runs of the same ``prunekit prune`` command, each its own process:

1. uninterrupted, into OUT_A (timed from spawn to exit);
2. into OUT_B, killed with SIGKILL as soon as the staging's manifest (``.OUT_B.partial/.prunekit-staging.json``)
   records two thirds of the layers finished;
3. the same command again into OUT_B (timed): it resumes.

Printed: the rerun's resume line, rerun time / uninterrupted time (target <= 0.75), whether OUT_B's
safetensors are byte-identical to OUT_A's, and what is left beside the outputs (target: nothing).

usage (a few minutes on 2 cores; needs ~12 GB of disk under --root):
  python benchmarks/bench_resume.py
  python benchmarks/bench_resume.py --base /work/ckpts/llama8b-8L --method sparsegpt --root /tmp/me/resume
The outputs are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = ".prunekit-staging.json"  # prunekit.staging.MANIFEST (not imported: this process stays light)


def command(base: Path, out: Path, method: str, nsamples: int, seqlen: int) -> list[str]:
    return [sys.executable, "-m", "prunekit.cli.main", "prune", str(base), "--method", method, "--sparsity", "0.5",
            "--calib", "en", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu", "--quiet",
            "--out", str(out)]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return elapsed, done


def kill_at(cmd: list[str], out: Path, layer: int) -> tuple[int, float]:
    """Run ``cmd`` and SIGKILL it once its staging records ``layer`` layers finished: (layers recorded, seconds)."""
    manifest = out.parent / f".{out.name}.partial" / MANIFEST
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finished = 0
    while process.poll() is None:
        try:
            finished = json.loads(manifest.read_text())["next_layer"]
        except (OSError, ValueError, KeyError):
            finished = 0
        if finished >= layer:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        sys.exit(f"the run ended ({process.returncode}) before layer {layer} was recorded:\n{process.stderr.read()[-3000:]}")
    return finished, time.perf_counter() - start


def digests(directory: Path) -> dict[str, str]:
    result = {}
    for file in sorted(directory.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(16 << 20), b""):
                digest.update(chunk)
        result[file.name] = digest.hexdigest()
    return result


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".old-" in p.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None,
                        help="an existing synthetic checkpoint (default: an 8-layer one generated under --root)")
    parser.add_argument("--root", type=Path, default=Path("/tmp") / os.environ.get("USER", "bench") / "bench-resume")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.root.exists():
        shutil.rmtree(args.root)
    args.root.mkdir(parents=True)
    if args.base is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_memory import generate

        args.base = generate(args.root / "base-8L", 8)
    layers = json.loads((args.base / "config.json").read_text())["num_hidden_layers"]
    kill_layer = math.ceil(2 * layers / 3)
    out_a, out_b = args.root / "uninterrupted", args.root / "resumed"
    try:
        full_s, _ = timed(command(args.base, out_a, args.method, args.nsamples, args.seqlen))
        print(f"uninterrupted: {full_s:.1f} s", flush=True)
        finished, killed_s = kill_at(command(args.base, out_b, args.method, args.nsamples, args.seqlen), out_b, kill_layer)
        print(f"killed with SIGKILL after {killed_s:.1f} s, {finished} of {layers} layers recorded finished", flush=True)
        rerun_s, rerun = timed(command(args.base, out_b, args.method, args.nsamples, args.seqlen))
        lines = [line for line in rerun.stderr.splitlines() if "resumed" in line or "removed" in line]
        print("rerun says: " + (" | ".join(lines) or "(nothing)"))
        print(f"rerun: {rerun_s:.1f} s = {rerun_s / full_s:.2f} x the uninterrupted run (target <= 0.75)")
        same = digests(out_a) == digests(out_b)
        print(f"safetensors byte-identical to the uninterrupted run: {'yes' if same else 'NO'}")
        print(f"left beside the outputs: {leftovers(args.root) or 'nothing'}")
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
