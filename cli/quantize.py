"""``prunekit quantize``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prunekit.cli.app import app, user_errors
from prunekit.cli.checkpoint_options import CheckpointOptions, checkpoint_options

stdout = Console()


def print_quantize_summary(record: dict, out: Path | None) -> None:
    """Per layer and module: the relative output error ‖(W−W′)X‖²/‖WX‖² on the first calibration batch."""
    from prunekit.artifacts import method_seconds, quantization_summary
    from prunekit.models import MODULE_NAMES

    recipe = record["recipe"]
    q = recipe["quantization"]
    group = "per-channel" if q["group_size"] == -1 else f"group size {q['group_size']}"
    summary = quantization_summary(record)
    layers = summary["per_layer"]
    table = Table(
        title=f"{recipe['method']} {q['bits']}-bit, {group} · {record['base_model']['spec']}",
        caption="relative output error ‖(W−W′)X‖²/‖WX‖² per module (first calibration batch)",
    )
    table.add_column("layer", justify="right")
    order = list(MODULE_NAMES)
    modules = sorted({m["name"] for layer in layers for m in layer["modules"]}, key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in modules:
        table.add_column(MODULE_NAMES.get(name, name), justify="right")
    for layer in layers:
        cells = {m["name"]: m for m in layer["modules"]}
        row = [str(layer["index"])]
        for name in modules:
            if layer["skipped"] or name not in cells:
                row.append("skipped" if layer["skipped"] else "-")
                continue
            err = cells[name]["relative_error"]
            row.append("-" if err is None else f"{err:.1e}")
        table.add_row(*row)
    stdout.print(table)
    timings = record["timings"]
    stdout.print(
        f"load {timings['load_s']:.1f}s, calibration {timings['calibration_s']:.1f}s, quantization {method_seconds(record):.1f}s"
    )
    dtype = record["base_model"]["dtype"]
    if summary["format"] != "dense":
        stdout.print(f"{summary['packed_linears']} Linears packed ({summary['format']}, {q['bits']}-bit codes); "
                     f"scales and the other tensors in {dtype}")
        for entry in summary["kept_dense"]:
            stdout.print(f"  kept in the base dtype: {entry['name']} ({entry['reason']})")
    if out is not None:
        stdout.print(size_line(out, record["base_model"]["path"], dtype, summary["format"]))
        what = (
            "fake-quantized weights in the model's dtype" if summary["format"] == "dense"
            else f"compressed-tensors {summary['format']}, {summary.get('scheme') or 'W4A16'}; `vllm serve {out}` serves it"
        )
        stdout.print(f"checkpoint written to [bold]{out}[/bold] ({what}; prunekit.json holds the quantization and the full record)")


def size_line(out: Path, base: str | Path, dtype: str, checkpoint_format: str) -> str:
    """What the written checkpoint's weight files take on disk, and their ratio to the base's weight files."""
    from prunekit.artifacts import weight_bytes

    written = weight_bytes(out) or 0
    what = f"fake-quantized weights in {dtype}" if checkpoint_format == "dense" else f"packed, the rest in {dtype}"
    line = f"weight files written: {written / 2**20:.2f} MiB on disk ({what})"
    base_bytes = weight_bytes(base) or 0
    if base_bytes:
        line += f", {written / base_bytes:.3f}× the base's weight files ({base_bytes / 2**20:.2f} MiB)"
    return line


@app.command()
@user_errors
@checkpoint_options(uncalibrated="rtn")
def quantize(
    options: CheckpointOptions,
    bits: int = typer.Option(4, "--bits", "-b", help="Bits per weight: 4 or 8 (the study's), also 2 or 3."),
    group_size: int = typer.Option(128, "--group-size", "-g", help="Input columns sharing one grid (scale, zero point); -1 = one grid per output row."),
    act_order: bool = typer.Option(False, "--act-order", help="Quantize columns by descending Hessian diagonal (groups stay fixed: static groups)."),
    dynamic_groups: bool = typer.Option(False, "--dynamic-groups", help="With --act-order: refit groups in activation order instead of fixing them first."),
    symmetric: Optional[bool] = typer.Option(
        None, "--symmetric/--asymmetric",
        help="--symmetric (the default): grid ±max|w|, no zero point, W4A16/W8A16 like llm-compressor's presets; plain "
             "transformers (with compressed-tensors) and vLLM load the packed checkpoint as it is. --asymmetric: min-max grid "
             "with zero points, the study's reference choice (the default under --conventions study); vLLM and prunekit "
             "load it, plain transformers with compressed-tensors 0.19-0.20 cannot."),
    method: str = typer.Option("gptq", "--method", "-m", help="gptq (error feedback, needs calibration) or rtn (round-to-nearest baseline)."),
    checkpoint_format: str = typer.Option(
        "packed", "--format",
        help="packed: compressed-tensors pack-quantized (int weights + scales, + zero points if --asymmetric; vLLM serves it; plain transformers with compressed-tensors installed loads the default symmetric grid); dense: fake-quantized weights in --dtype.",
    ),
) -> None:
    """Quantize MODEL's weights with GPTQ layer by layer, calibrated on text in one language or a mix.

    The checkpoint is compressed-tensors pack-quantized (what llm-compressor writes and `vllm serve` runs): per Linear the packed integer weights, the scales and, for an --asymmetric grid, the zero points, and a quantization_config in config.json. The default symmetric grid loads with `AutoModelForCausalLM.from_pretrained(OUT)` wherever compressed-tensors is installed. A Linear the format cannot hold (input width not a multiple of --group-size) stays in --dtype and is listed in prunekit.json. --format dense writes fake-quantized weights in --dtype instead (every group of a row takes at most 2^bits values).

    Example: prunekit quantize embedded:gemma-3-270m --bits 4 --group-size 128 --calib sw --nsamples 32 --seqlen 256 --out gemma-sw-w4g128
    """
    from prunekit.errors import ConfigError
    from prunekit.pipeline import method_of_kind, prune as run_prune
    from prunekit.recipe import parse_quantization

    quantization = parse_quantization(bits, group_size, act_order, static_groups=not dynamic_groups, symmetric=symmetric,
                                      conventions=options.conventions)
    if dynamic_groups and not act_order:
        raise ConfigError("--dynamic-groups only applies with --act-order")
    arguments = options.pipeline_arguments(checkpoint_format)
    method_of_kind(method, "quantize")  # a pruning method names `prunekit prune`
    result = run_prune(options.model, method, quantization=quantization, **arguments)
    if not options.quiet:
        print_quantize_summary(result.record, result.out)
