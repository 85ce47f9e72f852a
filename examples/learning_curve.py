#!/usr/bin/env python
"""Learning curves across benchmark runs: each row of examples/benchmark.py's tables (OUT/rows/*.json)
against the updates its model was trained for, so that runs of one training recipe at different
update counts read as one curve: does a system write better with more training, or only stutter less?

    python examples/learning_curve.py --runs paper=results/benchmark-cpu/boolq-warm64-pass \
        paper=results/benchmark-cpu/boolq-warm64-pass-1200 glance+KD=results/benchmark-cpu/boolq-warm64-kd-glance \
        [--systems ELMER-Soft "ELMER-Soft + KD"] [--out results/learning-curve]

A label names a training recipe and may be given several run folders (its runs at different updates).
A second stage (benchmark.py --elmer-from CKPT) counts its updates from 0: --after LABEL=N puts that
recipe's points at N + its own updates, the updates of the model it started from included.
Writes OUT/learning_curve.csv (one line per recipe, system and update count), OUT/learning_curve.png
(ROUGE-L and the share of outputs repeating a word against updates, one line per recipe and system)
and prints the table as markdown. Rows of older runs that lack a metric (length_r) leave it empty.
"""
import argparse
import csv
import json
import logging
from pathlib import Path

METRICS = ("rougeL", "bleu4", "repeat", "distinct1", "mean_len", "length_r")
COLUMNS = ("recipe", "system", "updates", *METRICS, "run")
DIGITS = {"rougeL": 2, "bleu4": 2, "repeat": 1, "distinct1": 1, "mean_len": 1, "length_r": 2}


def parse_runs(items):
    """[(recipe, run folder)] from LABEL=DIR items."""
    runs = []
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--runs {item!r}: expected LABEL=DIR (a recipe's name, '=', a benchmark run folder)")
        runs.append((label, Path(folder)))
    return runs


def parse_after(items):
    """{recipe: updates before its runs} from LABEL=N items."""
    after = {}
    for item in items:
        label, _, updates = item.partition("=")
        if not label or not updates.isdigit():
            raise SystemExit(f"--after {item!r}: expected LABEL=N (a recipe's name, '=', the updates of the "
                             f"checkpoint its runs started from)")
        after[label] = int(updates)
    return after


def load_run(recipe: str, run: Path, before: int = 0):
    """The rows of one benchmark run folder, as CSV lines of that recipe, `before` updates added."""
    rows_dir = run / "rows"
    if not rows_dir.is_dir():
        raise SystemExit(f"{run}: no rows/ folder: is it an examples/benchmark.py output folder?")
    files = sorted(rows_dir.glob("*.json"))
    if not files:
        raise SystemExit(f"{rows_dir}: no *.json rows: did the benchmark finish any system?")
    lines = []
    for path in files:
        row = json.loads(path.read_text(encoding="utf-8"))
        if "system" not in row or "updates" not in row:
            raise SystemExit(f"{path}: a row needs 'system' and 'updates'")
        # .get: rows written before a metric existed (length_r) lack it; missing, not zero
        lines.append({"recipe": recipe, "system": row["system"], "updates": before + int(row["updates"]),
                      **{m: row.get(m) for m in METRICS}, "run": str(run)})
    return lines


def collect(runs, systems=None, after=None):
    """Every run's rows (only the named systems, if any), sorted by recipe, system and updates;
    `after`: {recipe: updates its runs started from}."""
    after = after or {}
    unknown = sorted(set(after) - {recipe for recipe, _ in runs})
    if unknown:
        raise SystemExit(f"--after: {unknown} name no recipe of --runs")
    lines = [line for recipe, run in runs for line in load_run(recipe, run, after.get(recipe, 0))]
    if systems:
        missing = [name for name in systems if name not in {line["system"] for line in lines}]
        if missing:
            found = sorted({line["system"] for line in lines})
            raise SystemExit(f"--systems: {missing} in no run (rows found: {found})")
        lines = [line for line in lines if line["system"] in systems]
    seen = {}
    for line in lines:
        key = (line["recipe"], line["system"], line["updates"])
        if key in seen:
            # a curve has one point per update count: two would be two recipes under one label
            raise SystemExit(f"recipe {key[0]!r}, system {key[1]!r} at {key[2]} updates in two runs: "
                             f"{seen[key]} and {line['run']}")
        seen[key] = line["run"]
    return sorted(lines, key=lambda line: (line["recipe"], line["system"], line["updates"]))


def write_csv(lines, path: Path):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in line.items()} for line in lines)


def cell(line, column):
    value = line[column]
    if value is None:
        return "-"
    return f"{value:.{DIGITS[column]}f}" if column in DIGITS else str(value)


def markdown(lines):
    columns = COLUMNS[:-1]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(line, c) for c in columns) + " |" for line in lines]
    return "\n".join(out)


def plot(lines, path: Path):
    """ROUGE-L and repeat % against updates, one line per (recipe, system)."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    curves = {}
    for line in lines:
        curves.setdefault((line["recipe"], line["system"]), []).append(line)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("rougeL", "ROUGE-L"), ("repeat", "outputs repeating a word (%)"))
    for ax, (metric, title) in zip(axes, panels):
        for (recipe, system), points in curves.items():
            xy = [(p["updates"], p[metric]) for p in points if p[metric] is not None]
            if xy:
                ax.plot(*zip(*xy), "-o", label=f"{recipe}: {system}", markersize=4)
        ax.set_title(title, fontsize=10)
        if metric == "repeat":
            ax.set_ylim(0, 100)  # a share: autoscaled, 97.3 -> 97.6 would fill the panel as a steep climb
        ax.set_xlabel("updates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR",
                   help="benchmark run folders, each under its recipe's label (a label may name several)")
    p.add_argument("--systems", nargs="+", metavar="NAME", help="only these rows (exact names; default: every row)")
    p.add_argument("--after", nargs="+", default=[], metavar="LABEL=N",
                   help="the runs of recipe LABEL are a second stage, fine-tuned from a checkpoint of N updates "
                        "(benchmark.py --elmer-from): their points sit at N + their own updates")
    p.add_argument("--out", type=Path, default=Path("results/learning-curve"), help="folder for the CSV and the plot")
    args = p.parse_args(argv)
    lines = collect(parse_runs(args.runs), args.systems, parse_after(args.after))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(lines, args.out / "learning_curve.csv")
    plot(lines, args.out / "learning_curve.png")
    print(markdown(lines))


if __name__ == "__main__":
    main()
