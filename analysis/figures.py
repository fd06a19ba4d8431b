"""Render a compare result: PNG figures (matplotlib Agg), summary.md and a rich table for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prunekit.artifacts import PERPLEXITY_SETTINGS_NOTE, passage_perplexity_settings

LOW_LAPE_FRACTION = 0.30  # the study plots the neuron groups of the 30 % lowest LAPE only


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(plt, fig, path: Path) -> Path:
    """Lay ``fig`` out, write it as ``path`` (PNG, 110 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:  # nan
            return "–"
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 10 ** 5):
            return f"{x:.{digits}e}"
        return f"{x:.{digits}f}"
    return str(x)


# ------------------------------------------------------------------------------------------- figures


def make_figures(result: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if result.get("masks"):
        paths += _mask_heatmaps(result, folder)
    if result.get("lsar"):
        paths.append(_lsar_lines(result, folder))
    if result.get("lape"):
        paths.append(_lape_bins(result, folder))
    if result.get("drift"):
        paths.append(_drift_lines(result, folder))
    return paths


def iou_matrix(comparison: dict[str, Any], modules: list[str], num_layers: int) -> np.ndarray:
    """modules × layers IoU (nan where a cell is missing)."""
    grid = np.full((len(modules), num_layers), np.nan)
    for cell in comparison["per_layer"]:
        grid[modules.index(cell["module"]), cell["layer"]] = cell["iou"]
    return grid


def _mask_heatmaps(result, folder: Path) -> list[Path]:
    plt = _plt()
    masks = result["masks"]
    modules, layers = masks["modules"], masks["num_layers"]
    comps = masks["comparisons"]
    fig, axes = plt.subplots(len(comps), 1, figsize=(max(6, 0.35 * layers + 2), 2.6 * len(comps)), squeeze=False)
    for ax, (name, comp) in zip(axes[:, 0], comps.items()):
        grid = iou_matrix(comp, modules, layers)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        ax.set_yticks(range(len(modules)), modules)
        step = max(1, layers // 16)
        ax.set_xticks(range(0, layers, step))
        ax.set_xlabel("layer")
        glob = comp["global"]
        ax.set_title(f"{name}: IoU {_fmt(glob['iou'])} (chance {_fmt(glob['chance'])})", fontsize=9)
        fig.colorbar(image, ax=ax)
    return [_save(plt, fig, folder / "masks_iou.png")]


def _lsar_lines(result, folder: Path) -> Path:
    plt = _plt()
    lsar = result["lsar"]
    langs = result["settings"]["langs"]
    targets = list(lsar["per_target"])
    fig, axes = plt.subplots(2, len(targets), figsize=(5 * len(targets), 6), squeeze=False)
    for col, role in enumerate(targets):
        per_layer = lsar["per_target"][role]["per_layer"]
        for row, (key, title) in enumerate((("delta_agnostic", "language-agnostic"), ("delta_specific", "language-specific"))):
            ax = axes[row, col]
            for lang in langs:
                ax.plot([e["layer"] for e in per_layer], [e["per_language"][lang][key] for e in per_layer],
                        marker=".", label=lang)
            ax.set_title(f"{result['names'][role]} vs {result['names'][result['reference']]}: Δ {title}", fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(_integer_ticks())
            ax.set_ylabel("mean ‖Δ‖₂")
            ax.set_yscale("log")
    axes[0, -1].legend(title="eval", fontsize=7)
    return _save(plt, fig, folder / "lsar.png")


def _lape_bins(result, folder: Path) -> Path:
    plt = _plt()
    bins = result["lape"]["bins"]
    models = list(bins["global"])
    shown = max(1, int(round(bins["bins"] * LOW_LAPE_FRACTION)))
    fig, axes = plt.subplots(len(models) + 2, 1, figsize=(9, 2.2 * (len(models) + 2)), squeeze=False)
    width = bins["bin_fraction"] * 100
    for ax, role in zip(axes[:, 0], models):
        stats = [
            {"med": b["lape"]["median"], "q1": b["lape"]["q1"], "q3": b["lape"]["q3"],
             "whislo": b["lape"]["whisker_low"], "whishi": b["lape"]["whisker_high"], "fliers": []}
            for b in bins["global"][role][:shown]
        ]
        ax.bxp(stats, positions=[width * (i + 0.5) for i in range(shown)], widths=width * 0.7, showfliers=False)
        name = result["names"].get(role, role) if role != "reference" else result["names"][result["reference"]]
        ax.set_title(f"LAPE of {name}, neurons sorted by the reference's LAPE ({width:g} % bins)", fontsize=9)
        ax.set_ylabel("LAPE")
        ax.set_xticks([width * i for i in range(0, shown + 1, 5)], [f"{width * i:g}" for i in range(0, shown + 1, 5)])
    all_bins = bins["bins"]
    x = np.arange(all_bins) * width
    ax = axes[-2, 0]
    for role in models:
        label = result["names"][result["reference"]] if role == "reference" else result["names"].get(role, role)
        ax.plot(x, [b["activation_probability"]["max"] for b in bins["global"][role]], label=label)
    ax.set_ylabel("max-language p")
    ax.set_title("activation probability (language with the highest p), averaged per bin", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[-1, 0]
    for role in models:
        ax.plot(x, [b["mean_abs_output"]["all"] for b in bins["global"][role]])
    ax.set_ylabel("mean |output|")
    ax.set_xlabel("% of neurons (reference LAPE, ascending)")
    ax.set_title("mean absolute neuron output, averaged per bin", fontsize=9)
    return _save(plt, fig, folder / "lape.png")


def _drift_lines(result, folder: Path) -> Path:
    plt = _plt()
    drift = result["drift"]["per_target"]
    langs = result["settings"]["langs"]
    fig, axes = plt.subplots(1, len(drift), figsize=(5 * len(drift), 3.5), squeeze=False)
    for ax, (role, data) in zip(axes[0], drift.items()):
        for lang in langs:
            values = data["per_language"][lang]["mean_l2"]
            ax.plot(range(len(values)), values, marker=".", label=lang)
        ax.set_title(f"{result['names'][role]} vs {result['names'][result['reference']]}: mean ‖Δh‖₂ per token", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_yscale("log")
    axes[0, -1].legend(title="eval", fontsize=7)
    return _save(plt, fig, folder / "drift.png")


# ------------------------------------------------------------------------------------------- tables


def mask_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    masks = result["masks"]
    comps = masks["comparisons"]
    header = ["module"] + [f"{name} IoU (chance)" for name in comps]
    rows = []
    for module in masks["modules"] + ["all"]:
        row = [module]
        for comp in comps.values():
            agg = comp["global"] if module == "all" else comp["per_module"][module]
            row.append(f"{_fmt(agg['iou'])} ({_fmt(agg['chance'])})")
        rows.append(row)
    return header, rows


def lsar_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per target and language: Δ agnostic / specific averaged over layers and at the last layer."""
    langs = result["settings"]["langs"]
    header = ["target", "Δ"] + langs
    rows = []
    for role, data in result["lsar"]["per_target"].items():
        layers = data["per_layer"]
        for key, label in (("delta_agnostic", "agnostic"), ("delta_specific", "specific")):
            rows.append([result["names"][role], f"{label} (mean over layers)"]
                        + [_fmt(float(np.mean([e["per_language"][lang][key] for e in layers]))) for lang in langs])
            rows.append([result["names"][role], f"{label} (last layer)"]
                        + [_fmt(layers[-1]["per_language"][lang][key]) for lang in langs])
    return header, rows


def drift_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    langs = result["settings"]["langs"]
    header = ["target", "drift"] + langs
    rows = []
    for role, data in result["drift"]["per_target"].items():
        per = data["per_language"]
        rows.append([result["names"][role], "mean ‖Δh‖₂, mean over layers"]
                    + [_fmt(float(np.mean(per[lang]["mean_l2"]))) for lang in langs])
        rows.append([result["names"][role], "mean ‖Δh‖₂, last layer"] + [_fmt(per[lang]["mean_l2"][-1]) for lang in langs])
        rows.append([result["names"][role], "extra: mean |Δh| per feature, last layer"]
                    + [_fmt(per[lang]["mean_abs"][-1]) for lang in langs])
        rows.append([result["names"][role], "extra: relative, last layer"] + [_fmt(per[lang]["relative"][-1]) for lang in langs])
    return header, rows


def ppl_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    langs = result["settings"]["langs"]
    header = ["model"] + langs
    rows = [[result["names"][role]] + [_fmt(ppl[lang]["ppl"], 2) for lang in langs]
            for role, ppl in result["perplexity"].items()]
    return header, rows


def lape_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    lape = result["lape"]
    langs = result["settings"]["langs"]
    header = ["model", "mean LAPE", "never active"] + [f"specific {lang}" for lang in langs]
    rows = []
    for role, summ in lape["summary"].items():
        spec = lape["specific_neurons"][role]
        cells = []
        for lang in langs:
            cell = str(spec["counts"][lang])
            if "iou_with_reference" in spec:
                cell += f" (IoU {_fmt(spec['iou_with_reference'][lang], 2)})"
            cells.append(cell)
        rows.append([result["names"][role], _fmt(summ["mean_lape"]), str(summ["never_active"])] + cells)
    return header, rows


def deactivation_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    deact = result["lape"]["deactivation"]
    langs = result["settings"]["langs"]
    header = ["model", "neurons off"] + [f"ΔPPL {lang}" for lang in langs]
    rows = []
    for role, per in deact["per_model"].items():
        for lang, cells in per.items():
            if cells is None:
                continue
            rows.append([result["names"][role], f"{lang} ({deact['neurons'][lang]})"]
                        + [_fmt(cells[e]["delta_ppl"], 2) for e in langs])
    return header, rows


def _sections(result: dict[str, Any]) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
    ref = result["names"][result["reference"]]
    sections = []
    if result.get("masks"):
        m = result["masks"]
        sections.append(("Mask IoU", f"per module over all layers, micro Σ|∩|/Σ|∪|; chance level for independent masks in "
                         f"brackets; pruned set {m['definition']}", mask_rows(result)))
    if result.get("perplexity"):
        sections.append(("Perplexity", f"on the analysis text (valid content tokens); "
                         f"{passage_perplexity_settings(result['settings'])}. {PERPLEXITY_SETTINGS_NOTE}", ppl_rows(result)))
    if result.get("lsar"):
        sections.append(("LSAR drift", f"mean ‖Δ‖₂ of sentence embeddings against {ref}, subspace="
                         f"{result['lsar']['subspace']}, rank {result['lsar']['rank']}", lsar_rows(result)))
    if result.get("drift"):
        sections.append(("Hidden-state drift", f"mean over tokens of ‖h_ref − h‖₂ of the decoder-layer outputs against {ref} "
                         "(the study's Fig. 4); the per-feature mean |h_ref − h| is a labelled extra", drift_rows(result)))
    if result.get("lape"):
        sections.append(("LAPE", f"language-specific neurons (lowest {result['lape']['thresholds']['top_rate']:g} LAPE); "
                         "IoU with the reference's selection", lape_rows(result)))
        if result["lape"].get("deactivation"):
            sections.append(("Neuron deactivation", f"perplexity change when the {ref}'s language-specific neurons of "
                             "one language are switched off", deactivation_rows(result)))
    return sections


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def summary_markdown(result: dict[str, Any]) -> str:
    lines = ["# prunekit compare", ""]
    for role, info in result["models"].items():
        extra = info.get("prunekit") or {}
        bits = [f"`{info['spec']}`"]
        if extra:
            bits.append(f"{extra.get('method')} {extra.get('pattern')} calibrated on {extra.get('calibration')} "
                        f"(seed {extra.get('seed')})")
        lines.append(f"- **{result['names'][role]}**: " + ", ".join(bits))
    lines.append(f"- reference for LSAR/LAPE/drift: **{result['names'][result['reference']]}**")
    if result.get("texts"):
        t = result["texts"]
        tokens = ", ".join(f"{lang} {v['valid_tokens']}" for lang, v in t["languages"].items())
        lines.append(f"- text: `{t['source']}` ({t['split']} split); valid tokens per language: {tokens}")
    lines.append("")
    for title, caption, (header, rows) in _sections(result):
        lines += [f"## {title}", "", caption, "", _md_row(header), "|" + "|".join("---" for _ in header) + "|"]
        lines += [_md_row(row) for row in rows]
        lines.append("")
    if result.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    figures = [f for f in result.get("files", []) if f.startswith("figures/")]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def print_summary(result: dict[str, Any], console) -> None:
    """The rich tables of every analysis that ran."""
    from rich.table import Table

    for title, caption, (header, rows) in _sections(result):
        table = Table(title=title, caption=caption)
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
