"""The resumable staging of a streamed prune or quantize: ``.OUT.partial/`` beside ``--out``.

A streamed run writes its checkpoint into this directory (the writer's shards, ``prunekit.streaming``)
and, after each decoder layer, records there what a rerun needs to continue at the next one:

- ``.prunekit-staging.json``, the manifest: the run it belongs to (the run identity, the base's files by
  size and modification time, the engine settings that change the numbers and the library versions), the
  first unfinished layer, the finished layers' results and how the GEMMs ran (``backend.gemm_plan``);
- ``.prunekit-inputs-NNNNN.safetensors``: the calibration activations entering layer NNNNN, one tensor
  per micro-batch (N × T × hidden × bytes; the layers' forward kwargs are captured again instead);
- the owner's lock and record (``prunekit.io.owned``): a live run's staging is never touched.

The writer flushes each finished layer before the manifest says so, and the manifest and the inputs are
written atomically (temporary name + rename), so a kill -9 at any moment leaves a consistent state: the
manifest's layers are on disk, and a layer it does not list is written again. A rerun of the same command
(``Staging`` finds the same run) continues at the first unfinished layer; a staging of another run, or
every staging with ``resume=False``, is removed first (said in one line with its size). On success the
staging's own files are removed and the directory becomes ``--out`` (``prunekit.io.atomic_directory``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit.artifacts import STAGING_KIND
from prunekit.engine import LayerResult, ModuleResult, ResumePoint
from prunekit.errors import ConfigError
from prunekit.io import OWNER_FILE, OWNER_LOCK, format_size, owned, owner_alive, owner_of, tree_bytes, write_json_atomic

STAGING_VERSION = 1
MANIFEST = ".prunekit-staging.json"
INPUTS = ".prunekit-inputs-{:05d}.safetensors"
KILL_AFTER_LAYER = "PRUNEKIT_TEST_KILL_AFTER_LAYER"  # tests and benchmarks: SIGKILL this process after layer N


def staging_path(out: str | Path) -> Path:
    """The resumable staging of ``out``: ``.OUT.partial`` beside it (a fixed name, so a rerun finds it)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def discard_staging(out: str | Path, say: Callable[[str], None]) -> None:
    """Remove ``out``'s staging (a run that does not stream cannot resume it) unless a live process owns
    it, saying so with its size."""
    path = staging_path(out)
    if path.is_dir() and not owner_alive(path):
        size = tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        say(f"removed {path.name} ({format_size(size)}) beside {Path(out).name}: an interrupted streamed run's "
            "staging, which this run (not streamed) cannot resume")


def file_fingerprint(directory: str | Path, files: list[str]) -> dict[str, list[int]]:
    """name -> [size, modification time in ns] of the named files of ``directory`` (the base's shards)."""
    directory = Path(directory)
    prints = {}
    for name in files:
        stat = (directory / name).stat()
        prints[name] = [stat.st_size, stat.st_mtime_ns]
    return prints


def _normal(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True))


def _layer_json(layer: LayerResult) -> dict[str, Any]:
    data = asdict(LayerResult(layer.index, layer.skipped, layer.seconds))
    data["modules"] = [{**asdict(ModuleResult(m.name, m.shape, m.sparsity, m.relative_error)),
                        "info": {k: v for k, v in m.info.items() if k != "grid"}} for m in layer.modules]
    return data


def _layer_result(data: dict[str, Any]) -> LayerResult:
    modules = [ModuleResult(m["name"], tuple(m["shape"]), m["sparsity"], m["relative_error"], m.get("info", {}))
               for m in data["modules"]]
    return LayerResult(data["index"], data["skipped"], data["seconds"], modules)


class Staging:
    """The staging directory of one streamed run towards ``out`` (a context manager holding it).

    ``run`` is the JSON description a staging must match to be resumed (see the module's docstring).
    On entering, a staging left by a dead process is resumed (``point``: where to continue; ``gemms``:
    as the interrupted run computed) or removed; one a live process owns raises ConfigError."""

    def __init__(self, out: str | Path, run: dict[str, Any], say: Callable[[str], None], resume: bool = True,
                 resumable: bool = True):
        self.out = Path(out)
        self.path = staging_path(self.out)
        self.run = _normal(run)
        self.say = say
        self.resumable = resumable  # the writer can continue in a staging (else nothing is recorded)
        self.resume = resume and resumable
        self.point: ResumePoint | None = None
        self.gemms: str | None = None
        self.layers: int | None = None
        self._stack = contextlib.ExitStack()
        self._inputs: str | None = None
        self.finished = 0  # layers on disk (recorded in the manifest)

    # ------------------------------------------------------------------------------------ entering

    def __enter__(self) -> "Staging":
        from prunekit.locks import LockBusy

        previous = owner_of(self.path) if self.path.exists() else None
        if self.path.exists() and owner_alive(self.path, previous):
            who = f"pid {previous.get('pid')} on {previous.get('host')}" if previous else "another process"
            raise ConfigError(f"'{self.out}' is being written by {who} (its staging {self.path.name} is in use); "
                              "wait for it to finish or choose another --out")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        try:
            self._stack.enter_context(owned(self.path, self.out.name))
        except LockBusy:
            raise ConfigError(f"'{self.out}' is being written by another process (its staging {self.path.name} "
                              "is in use); wait for it to finish or choose another --out") from None
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        manifest = self._manifest()
        leftover = any(p.name not in (OWNER_FILE, OWNER_LOCK) for p in self.path.iterdir())
        if not leftover:
            return
        reason = self._mismatch(manifest)
        if reason is None and not self.resume:
            reason = "--no-resume"
        if reason is None:
            self.point = self._load(manifest)
            self.gemms = manifest.get("gemms")
            self._inputs = manifest.get("inputs")
            done = self.finished = self.point.next_layer
            reused = (f"layers 0-{done - 1} and the activations entering layer {done}" if done
                      else "the copy of the base's shards")
            self.say(f"resumed at layer {done} of {manifest['num_layers']}: {reused} reused from {self.path.name} "
                     f"({format_size(tree_bytes(self.path))})")
            return
        size = tree_bytes(self.path)
        for entry in self.path.iterdir():
            if entry.name in (OWNER_FILE, OWNER_LOCK):
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.say(f"removed {self.path.name} ({format_size(size)}) beside {self.out.name}: {reason}; starting at layer 0")

    def _manifest(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("kind") == STAGING_KIND and data.get("schema_version") == STAGING_VERSION:
                return data
        return None

    def _mismatch(self, manifest: dict[str, Any] | None) -> str | None:
        """Why the staging cannot be resumed by this run (None: it can)."""
        if manifest is None:
            return "an interrupted run's, with no readable manifest"
        theirs = manifest.get("run", {})
        for key, what in (("identity", "another run (recipe, calibration, base or dtype)"),
                          ("base", "a base checkpoint that has changed since"),
                          ("engine", "other engine settings (device, batch size, solve threads, activations)"),
                          ("versions", "other library versions")):
            if theirs.get(key) != self.run.get(key):
                return f"it belongs to {what}"
        if theirs != self.run:
            return "it belongs to another run"
        inputs = manifest.get("inputs")
        if inputs is not None and not (self.path / inputs).is_file():
            return "its layer inputs are missing"
        return None

    def _load(self, manifest: dict[str, Any]) -> ResumePoint:
        from safetensors.torch import load_file

        results = [_layer_result(layer) for layer in manifest["layers"]]
        hidden = None
        if manifest.get("inputs") is not None:
            tensors = load_file(self.path / manifest["inputs"])
            hidden = [tensors.pop(key) for key in sorted(tensors)]
        return ResumePoint(manifest["next_layer"], results, hidden)

    # ------------------------------------------------------------------------------------- writing

    def started(self, num_layers: int, gemms: str | None) -> None:
        """The writer has filled a fresh staging (or resumed one): record it (layer 0 next, when fresh)."""
        self.layers = num_layers
        if self.point is None and self.resumable:
            self.gemms = gemms
            self._write(0, [], None)

    def layer_done(self, index: int, hidden: list[torch.Tensor] | None, results: list[LayerResult]) -> None:
        """Layer ``index`` is written and flushed: keep the activations entering the next one, then record
        it finished. A kill before the manifest's rename leaves the previous, still consistent, state."""
        inputs = None
        if hidden is not None:
            from safetensors.torch import save_file

            inputs = INPUTS.format(index + 1)
            tmp = self.path / f"{inputs}.tmp"
            save_file({f"batch.{i:05d}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path / inputs)
        self._write(index + 1, results, inputs)
        self.finished = index + 1
        for entry in self.path.glob(".prunekit-inputs-*"):
            if entry.name != inputs:
                entry.unlink(missing_ok=True)
        if os.environ.get(KILL_AFTER_LAYER) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)

    def _write(self, next_layer: int, results: list[LayerResult], inputs: str | None) -> None:
        self._inputs = inputs
        write_json_atomic(self.path / MANIFEST, {
            "kind": STAGING_KIND, "schema_version": STAGING_VERSION, "run": self.run, "num_layers": self.layers,
            "next_layer": next_layer, "gemms": self.gemms, "inputs": inputs,
            "layers": [_layer_json(layer) for layer in results],
        })

    def finish(self) -> None:
        """The checkpoint is whole in the staging: remove the staging's own files and give it up (the
        caller then renames the directory to ``out``)."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for entry in self.path.glob(".prunekit-inputs-*"):
            entry.unlink(missing_ok=True)
        self._stack.close()

    def kept(self) -> str | None:
        """What a failure now leaves for a rerun to resume (None: nothing; the staging is then removed)."""
        if not self.finished:
            return None
        return (f"its {self.finished} finished layers are kept in {self.path.name} "
                f"({format_size(tree_bytes(self.path))}): rerun the same command to resume")

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self._stack.close()
        if kind is not None and not self.finished:  # nothing to resume: nothing left behind
            shutil.rmtree(self.path, ignore_errors=True)
