"""Draw README.md's recipe figures from bench_recipes.py's JSON: test accuracy per epoch, over seeds, per variant.

One PNG per recipe (``docs/recipes-<recipe>.png``): each variant's mean over seeds as a line with its min..max band,
the source's stated figures as markers in the colour of the variant they describe. Reads the same files as
``tools/readme_tables.py`` (the full-length run, or the smoke run standing in for it, titled so):

    python tools/recipe_plots.py        # after committing new docs/results/recipes-*.json; then readme_tables.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
from readme_tables import (  # noqa: E402  (tools/readme_tables.py: the same files, paths and labels)
    RECIPE_SEEDS,
    ROOT,
    load_recipe_tables,
    load_report,
    recipe_plot_path,
    recipe_seeds_report,
)

#: variant -> colour; a source figure labelled "BN" / "no BN" takes the colour of "ours" / "none"
COLOURS = {"ours": "tab:blue", "keras": "tab:green", "none": "tab:red"}
SOURCE_VARIANT = {"BN": "ours", "no BN": "none"}


def plot_recipe(recipe: str, saved: dict, out: Path) -> None:
    """Write one recipe's figure to ``out``."""
    from export.recipes import RECIPES

    result = saved["results"][recipe]
    epochs = list(range(1, result["epochs"] + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for variant, entry in result["variants"].items():
        colour, label = COLOURS.get(variant, "tab:gray"), load_recipe_tables().variant_label(recipe, variant)
        summary = entry["summary"]
        ax.plot(epochs, [100 * v for v in summary["mean"]], color=colour, marker=".", label=f"{label} (mean)")
        low, high = [100 * v for v in summary["min"]], [100 * v for v in summary["max"]]
        ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
    for source_label, figures in (result.get("source_figures") or {}).items():
        colour = COLOURS[SOURCE_VARIANT.get(source_label, "keras")]
        xs = [int(e) for e in figures]
        ax.scatter(xs, [100 * figures[e] for e in figures], color=colour, marker="x", s=60, zorder=3,
                   label=f"source, {source_label}")  # fmt: skip
    seeds = ", ".join(str(s) for s in result["seeds"])
    kind = "" if result["full_length"] else " - SMOKE RUN, not the recipe's figures"
    ax.set_title(f"{RECIPES[recipe].title}\n{result['dataset']}, seeds {seeds}: band = min..max{kind}", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    last = max([len(epochs), *(int(e) for figures in (result.get("source_figures") or {}).values() for e in figures)])
    ax.set_xticks(range(1, last + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    # No timestamp in the PNG's metadata: the same JSON gives the same bytes.
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write the PNGs here instead of docs/")
    args = parser.parse_args(argv)
    for recipe in RECIPE_SEEDS:
        out = ROOT / recipe_plot_path(recipe)
        if args.out_dir:
            out = Path(args.out_dir) / out.name
        plot_recipe(recipe, load_report(recipe_seeds_report(recipe)), out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
