"""Write the README's Results tables from built reports, so that no figure in them is typed by hand.

    python -m reports.readme [--search REPORT ...] [--ablation REPORT ...] [--readme README.md]
                             [--preface TEXT]

Reads the tables a report build wrote (tables/summary.csv, best.csv, ablation.csv) and replaces
what lies between the `<!-- results:start -->` and `<!-- results:end -->` markers: the preface
(the text above the first table: kept unless --preface replaces it), then each search's best
trials and each ablation's effects, in the order given (by default the committed examples
`quick`, `recipe_search`, `pos_embedding_ladder` and `recipe_confirm`, those that exist).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

START, END = "<!-- results:start -->", "<!-- results:end -->"


def summary(report: Path) -> pd.Series:
    return pd.read_csv(report / "tables" / "summary.csv", index_col=0).iloc[:, 0]


def heading(kind: str, report: Path, finals: bool = True) -> str:
    """A study's line above its table: what it is, its report, its trials and their budget."""
    s = summary(report)
    head = f"**{kind}** (`{report.name}`, report: `{report}/report.html`): {s['trials']} trials"
    if not finals:
        return f"{head}, none at its full budget yet: no accuracies to show."
    return (f"{head}, {s['full-budget trials']} at the full budget of {s['max epochs']} epochs, "
            f"{float(s['compute hours (sum of epoch_seconds)']):.2f} compute hours.")


def search_section(report: Path) -> str:
    best = pd.read_csv(report / "tables" / "best.csv")
    shown = [c for c in best.columns if c not in ("run_id",)]
    return "\n".join([
        heading("Search", report) + " Best by val_acc (test_acc shown, never used to choose):",
        "",
        markdown(best[shown]),
    ])


def ablation_section(report: Path) -> str:
    if not (report / "tables" / "ablation.csv").exists():  # the report found no final accuracy
        return heading("Ablation", report, finals=False)
    effects = pd.read_csv(report / "tables" / "ablation.csv")
    # an ablation without factors (the base configuration over seeds) has no factor table and
    # nothing to compare: its one row is the configuration's accuracy over the seeds
    compared = (report / "tables" / "factors.csv").exists()
    rows = (["| cell | n | val_acc mean [95% CI] | diff to baseline [95% CI] | p | verdict | "
             "test_acc mean |", "|---|---|---|---|---|---|---|"] if compared else
            ["| configuration | seeds | val_acc mean [95% CI] | test_acc mean |",
             "|---|---|---|---|"])
    for _, r in effects.iterrows():
        diff = ("" if pd.isna(r.get("diff_low")) else
                f"{r['diff']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}]")
        p = "" if pd.isna(r.get("p_value")) else f"{r['p_value']:.3f}"
        test = "" if pd.isna(r.get("test_acc_mean")) else f"{r['test_acc_mean']:.4f}"
        val = (f"{r['mean']:.4f} (one seed: no interval)" if r["n"] < 2 else
               f"{r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
        shown = [val, diff, p, r["verdict"], test] if compared else [val, test]
        rows.append(f"| {r['cell']} | {int(r['n'])} | " + " | ".join(shown) + " |")
    return "\n".join([
        heading("Ablation" if compared else "Confirmation", report)
        + (" Effects at the longest budget:" if (report / "tables" / "ladder.csv").exists()
           else ""),
        "", *rows, *ladder_section(report)])


def ladder_section(report: Path) -> list[str]:
    """A budget ladder's verdicts: per factor, then per effect with its difference at each
    budget. Nothing for a study without a ladder."""
    if not (report / "tables" / "ladder_holds.csv").exists():
        return []
    factors = pd.read_csv(report / "tables" / "ladder_factors.csv", index_col=0).iloc[:, 0]
    holds = pd.read_csv(report / "tables" / "ladder_holds.csv")
    rows = ["| effect | val_acc difference to baseline, points (at epochs) | verdict |",
            "|---|---|---|"]
    rows += [f"| {r.cell} | {r.diff_by_budget} | {r.verdict} |" for r in holds.itertuples()]
    return ["", "Across the budget ladder (each budget a whole training):", "",
            *(f"- `{factor}`: {line}" for factor, line in factors.items()), "", *rows]


def markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:  # counts (a parameter count read back as float) print as integers
        if isinstance(v, float):
            return f"{v:.0f}" if v.is_integer() and abs(v) >= 1000 else f"{v:.4f}"
        return str(v)
    return "\n".join(["| " + " | ".join(map(str, table.columns)) + " |",
                      "|" + "---|" * len(table.columns),
                      *("| " + " | ".join(cell(v) for v in row) + " |"
                        for row in table.itertuples(index=False))])


def render(searches: list[Path], ablations: list[Path]) -> str:
    return "\n\n".join([*map(search_section, searches), *map(ablation_section, ablations)])


# where the generated part of the section begins: its first table's heading
FIRST_TABLE = re.compile(r"^\*\*(?:Search|Ablation|Confirmation)\*\* ", re.M)


def replace_section(readme: Path, body: str, preface: str | None) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {START} ... {END} markers")
    if preface is None:
        preface = FIRST_TABLE.split(text.split(START, 1)[1].split(END, 1)[0], maxsplit=1)[0]
    inside = f"{preface.strip()}\n\n{body}".strip()
    text = re.sub(f"{re.escape(START)}.*?{re.escape(END)}",
                  lambda _: f"{START}\n{inside}\n{END}", text, flags=re.S)
    readme.write_text(text)


EXAMPLES = Path("reports/examples")
SEARCHES, ABLATIONS = ("quick", "recipe_search"), ("pos_embedding_ladder", "recipe_confirm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.readme", description=__doc__.split("\n")[0])
    ap.add_argument("--search", type=Path, action="append", help="a search's report folder")
    ap.add_argument("--ablation", type=Path, action="append", help="an ablation's report folder")
    ap.add_argument("--readme", type=Path, default=Path("README.md"))
    ap.add_argument("--preface", help="text placed above the tables (default: the README's)")
    args = ap.parse_args(argv)
    if args.search is None and args.ablation is None:
        args.search = [EXAMPLES / n for n in SEARCHES if (EXAMPLES / n / "tables").is_dir()]
        args.ablation = [EXAMPLES / n for n in ABLATIONS if (EXAMPLES / n / "tables").is_dir()]
    body = render(args.search or [], args.ablation or [])
    replace_section(args.readme, body, args.preface)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
