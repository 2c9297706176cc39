"""Rebuild a study's report from its MLflow runs, headless.

    python -m reports.build --experiment NAME [--experiment NAME2 ...] [--tracking-uri URI]
                            [--out DIR]

One experiment gives a study report (study_report.py), several a side-by-side comparison
(comparison_report.py). The jupytext source is converted, given its parameters in a cell
injected after the one tagged `parameters`, executed with nbclient, and written to OUT as
report.ipynb and report.html beside the figures/*.png and tables/*.csv the notebook saves.
The HTML shows prose, tables and figures, not code; the notebook keeps the code. Neither names
a folder of the machine that built them: paths in the repository are written relative to it,
the home folder as ~, and a store or output folder elsewhere by its last name alone.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from reports.analysis import ReportError, check_experiment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # where the kernel runs
CELL_TIMEOUT = 600  # seconds; the slowest cell loads a checkpoint and the test images
# the kernel draws headless, and a saved report has no use for progress bars: MLflow's would
# log every download, tqdm's (imported by optuna) would ask for Jupyter widgets
MANIFEST = ".report-files"  # what a build wrote: the next build into the folder removes only these
OWN_FILES, OWN_FOLDERS = ("report.ipynb", "report.html"), ("figures", "tables")
KERNEL_ENV = {"MPLBACKEND": "Agg", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
              "PYTHONWARNINGS": "ignore:IProgress not found"}


def build(experiments: list[str], tracking_uri: str, out: str | Path | None = None) -> Path:
    """Regenerate the report of one study (or the comparison of several) into `out`
    (default reports/out/<experiment>, or <A>_vs_<B>); returns `out`."""
    experiments = list(dict.fromkeys(experiments))  # a study named twice is one study
    if not experiments:
        raise ReportError("no experiment given")
    for experiment in experiments:
        check_experiment(tracking_uri, experiment)  # one-line error, before a kernel starts
    out = Path(out or HERE / "out" / "_vs_".join(map(_safe_name, experiments))).resolve()
    _remove_previous_build(out)  # a section skipped this time must not leave old files
    started = time.time() - 1  # file systems with coarse timestamps
    out.mkdir(parents=True, exist_ok=True)

    single = len(experiments) == 1
    notebook = jupytext.read(HERE / ("study_report.py" if single else "comparison_report.py"))
    inject_parameters(notebook, TRACKING_URI=tracking_uri, OUT=str(out),
                      **({"EXPERIMENT": experiments[0]} if single else
                         {"EXPERIMENTS": list(experiments)}))
    # the kernel runs from the repository root so that `import reports` finds this package;
    # its log stays quiet about the loopback connection to this process (not encrypted)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(ROOT)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    try:
        client.execute(env={**os.environ, **KERNEL_ENV})
    finally:  # a notebook that failed half-way is the best account of why
        notebook = without_local_paths(notebook, [_local_path(tracking_uri), out])
        nbformat.write(notebook, out / "report.ipynb")
    html, _ = HTMLExporter(exclude_input=True).from_notebook_node(
        notebook, resources={"metadata": {"name": " vs ".join(experiments)}})  # the page title
    (out / "report.html").write_text(html, encoding="utf-8")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                     and p.stat().st_mtime >= started
                     and (p.name in OWN_FILES or p.parent.name in OWN_FOLDERS))
    (out / MANIFEST).write_text("\n".join(written) + "\n")
    return out


def _remove_previous_build(out: Path) -> None:
    """Delete what the previous build into `out` wrote, as its manifest lists it, and nothing
    else: `--out` may name a folder that holds the user's own files."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    for name in manifest.read_text().splitlines():
        path = (out / name).resolve()
        if name and path.is_relative_to(out) and path.is_file():
            path.unlink()
    for folder in OWN_FOLDERS:
        if (out / folder).is_dir() and not any((out / folder).iterdir()):
            (out / folder).rmdir()


def without_local_paths(notebook: nbformat.NotebookNode,
                        elsewhere: list[Path | None]) -> nbformat.NotebookNode:
    """The notebook, sources and outputs, with no absolute path of this machine: the kernel
    needed them, a report read or committed elsewhere must not carry them. `elsewhere` are
    the store and output folder the build was given, shown as .../<name> if outside the
    repository."""
    shown = {str(p): f"\N{HORIZONTAL ELLIPSIS}/{p.name}" for p in elsewhere
             if p is not None and p.is_absolute() and not p.is_relative_to(ROOT)}
    shown |= {f"{ROOT}{os.sep}": "", str(ROOT): "."}
    if len(Path.home().parts) > 1:  # a home of / would match every path
        shown |= {f"{Path.home()}{os.sep}": "~/", str(Path.home()): "~"}
    text = nbformat.writes(notebook)
    for path in sorted(shown, key=len, reverse=True):  # a folder before the folder holding it
        # whole names only: /a/b must not match inside /x/a/b, /a/bc or /a/b.d (a sentence may
        # end right after it)
        end = "" if path.endswith(os.sep) else r"(?![\w-]|\.\w)"
        text = re.sub(r"(?<![\w.-])" + re.escape(path) + end, lambda _, new=shown[path]: new,
                      text)
    return nbformat.reads(text, as_version=nbformat.NO_CONVERT)


def _local_path(tracking_uri: str) -> Path | None:
    """The file or folder of a local MLflow store (sqlite:///, file://, a plain path); None for
    a server."""
    for scheme in ("sqlite:///", "file://"):
        if tracking_uri.startswith(scheme):
            return Path(tracking_uri.removeprefix(scheme))
    return None if "://" in tracking_uri else Path(tracking_uri)


def inject_parameters(notebook: nbformat.NotebookNode, **params) -> None:
    """Insert a cell setting `params` right after the cell tagged `parameters`, so the
    notebook's defaults stay readable in its source and the build's values win."""
    tagged = [i for i, cell in enumerate(notebook.cells)
              if "parameters" in cell.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError("the report notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged[0] + 1, cell)


def _safe_name(experiment: str) -> str:
    return re.sub(r"[^\w.-]+", "_", experiment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", required=True,
                        help="MLflow experiment (study) name; repeat to compare studies")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    parser.add_argument("--out", help="output folder (default: reports/out/<experiment>)")
    args = parser.parse_args(argv)
    # MLflow's default retries wait minutes on a server that is down; a report should say so
    # in seconds (set the variable to override)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        if not tracking_uri:
            raise ReportError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        out = build(args.experiment, tracking_uri, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
