"""Reports built from a real SQLite MLflow store whose numbers the tests plant: the tables must
give back the planted means, intervals, effects and rankings; the CLI must fail in one line."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import nbformat
import pandas as pd
import pytest
import torch
from bs4 import BeautifulSoup
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

import contract
from reports import analysis
from reports.build import build, main, without_local_paths
from studyutil import sqlite_store
from tinyvit.config import Config
from tinyvit.model import TinyViT

# one worker builds this module's store and reports once (make test runs pytest -n 3)
pytestmark = pytest.mark.xdist_group("reports")

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}  # Student t quantiles, by degrees of freedom


def log_trial(client, experiment_id, trial, params, accs, *, status="completed", seed=0,
              mode="search", searched="model.depth,model.heads,model.pos_embedding", cell=None,
              parent=None):
    """One trial as the study runner logs it: params, per-epoch metrics, and the tags; a child
    of the study's run `parent` if given."""
    tags = {"study": "s", "study_id": "s-1", "mode": mode, "trial_id": trial, "seed": str(seed),
            "budget": str(len(accs)), "max_epochs": str(EPOCHS), "status": status,
            "searched": searched, **({"cell": cell} if cell else {}),
            **({"mlflow.parentRunId": parent} if parent else {})}
    run = client.create_run(experiment_id, run_name=trial, tags=tags)
    params = {"train.epochs": EPOCHS, "train.seed": seed, "data.source": "synthetic", **params}
    metrics = [Metric(key, value, 0, epoch) for epoch, acc in enumerate(accs, start=1)
               for key, value in [("val_acc", acc), ("epoch_seconds", 2.0),
                                  ("images_per_sec", 900.0 + 100 * epoch)]]
    if accs:
        metrics.append(Metric("params", 1000.0 * params.get("model.depth", 1), 0, 1))
    if status == "completed" and len(accs) == EPOCHS:
        metrics.append(Metric("test_acc", accs[-1] - 0.01, 0, EPOCHS))
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED" if status != "errored" else "FAILED")
    return run.info.run_id


def curve(final):
    return [final * 0.6, final * 0.8, final]


# depth plants a strong effect, heads and pos_embedding none (a small wobble, not a trend)
SEARCH = [{"model.depth": d, "model.heads": h, "model.pos_embedding": p,
           "final": 0.2 + 0.1 * d + 0.001 * i}
          for i, (d, h, p) in enumerate((d, h, p) for d in (2, 4, 6) for h in (2, 4)
                                        for p in ("learned", "none"))]
# seed -> final val_acc of each ablation cell; seeds pair up across cells
ABLATION = {
    "baseline": {0: 0.70, 1: 0.72, 2: 0.74},
    "model.pos_embedding=none": {0: 0.66, 1: 0.67, 2: 0.70},  # lower by 4-5 points every seed
    "model.pool=mean": {0: 0.71, 1: 0.71, 2: 0.745},  # +1, -1, +0.5: no clear effect
    "model.pos_embedding=rope2d": {0: 0.73, 1: 0.76},  # two seeds only
}

CONFIRM = {0: 0.78, 1: 0.80, 2: 0.79}


def cell_params(cell):
    """The config of an ablation cell: the baseline's, with the cell's key=value pairs."""
    changed = dict(kv.split("=") for kv in cell.split(",")) if cell != "baseline" else {}
    return {"model.pos_embedding": "learned", "model.pool": "cls", **changed}


def tiny_checkpoint(path: Path, cache_dir: Path) -> Path:
    """A checkpoint as the trainer writes it, of an untrained model on synthetic data."""
    cfg = Config.from_dict({
        "model": {"patch_size": 8, "embed_dim": 16, "depth": 2, "heads": 2},
        "data": {"source": "synthetic", "synthetic_train": 20, "synthetic_test": 10,
                 "val_size": 5, "cache_dir": str(cache_dir)}})
    torch.manual_seed(0)
    torch.save({"config": cfg.to_dict(), "model": TinyViT(cfg.model).state_dict(),
                "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": EPOCHS}, path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_schema):
    """A SQLite MLflow store with a search study, an ablation study, a study still running
    and two that cannot be reported on."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = sqlite_store(mlflow_schema, tmp / "mlflow.db")
    client = MlflowClient(uri)
    new = lambda name: client.create_experiment(name, (tmp / "artifacts").as_uri())  # noqa: E731

    search = new("search")
    # the study's own run, parent of its trials, as the runner logs it: no trial id; a best
    # val_acc above every trial's, so that counting it as a trial would show
    study = client.create_run(search, run_name="search", tags={
        "study": "s", "study_id": "s-1", "mode": "search"}).info.run_id
    client.log_metric(study, "val_acc", 0.99)
    for i, t in enumerate(SEARCH):
        params = {k: v for k, v in t.items() if k != "final"}
        run_id = log_trial(client, search, f"trial_{i:02d}", params, curve(t["final"]),
                           parent=study)
        if i == len(SEARCH) - 1:  # the best trial
            client.log_artifact(run_id, tiny_checkpoint(tmp / "model.pt", tmp / "cache"),
                                "checkpoint")
    # early-stopped trials with truncated accuracies far below every final one
    for i, depth in enumerate((2, 4, 6)):
        log_trial(client, search, f"trial_es{i}", {"model.depth": depth, "model.heads": 2,
                  "model.pos_embedding": "learned"}, [0.05], status="early-stopped", parent=study)
    log_trial(client, search, "trial_err", {"model.depth": 2, "model.heads": 2,
              "model.pos_embedding": "none"}, [], status="errored", parent=study)

    ablation = new("ablation")
    for cell, seeds in ABLATION.items():
        for seed, final in seeds.items():
            log_trial(client, ablation, f"{cell}/seed{seed}", cell_params(cell), curve(final),
                      seed=seed, mode="ablation", searched="model.pos_embedding,model.pool",
                      cell=cell)

    confirm = new("confirm")  # an ablation without factors: the base configuration over seeds
    for seed, final in CONFIRM.items():
        log_trial(client, confirm, f"baseline/seed{seed}", cell_params("baseline"), curve(final),
                  seed=seed, mode="ablation", searched="", cell="baseline")

    running = new("running")  # no trial has finished yet
    for i, depth in enumerate((2, 4)):  # data.subset set in one trial only, like a conditional key
        log_trial(client, running, f"trial_{i}", {"model.depth": depth, "model.heads": 2,
                  "model.pos_embedding": "none", **({"data.subset": 500} if i else {})},
                  [0.3, 0.4], status="running")
    log_trial(client, running, "trial_es", {"model.depth": 2, "model.heads": 2,
              "model.pos_embedding": "none"}, [0.2], status="early-stopped")

    new("empty")
    no_metric = new("no-metric")
    client.create_run(no_metric, run_name="t0", tags={"trial_id": "t0", "status": "completed"})
    parent_only = new("parent-only")  # a study whose first trial has not started
    client.create_run(parent_only, run_name="parent-only", tags={"study": "parent-only"})
    return uri


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "reports.build", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def search_report(store, tmp_path_factory):
    """Built through the CLI's entry point, in this process (a new interpreter's imports take
    ~7 s of CPU; test_unknown_experiment_fails_in_one_line runs the CLI as a process)."""
    out = tmp_path_factory.mktemp("search") / "report"
    assert main(["--experiment", "search", "--tracking-uri", store, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ablation_report(store, tmp_path_factory):
    return build(["ablation"], store, tmp_path_factory.mktemp("ablation") / "report")


def table(out, name, **kwargs):
    return pd.read_csv(out / "tables" / f"{name}.csv", **kwargs)


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()


def test_load_runs_converts_params_and_sums_compute(store):
    runs = analysis.load_runs(store, "search")
    assert len(runs) == len(SEARCH) + 4
    assert runs["model.depth"].dtype.kind == "i" and runs["budget"].dtype.kind == "i"
    assert runs["model.pos_embedding"].dtype.kind not in "if"
    assert runs.compute_seconds.sum() == pytest.approx(2.0 * (EPOCHS * len(SEARCH) + 3))
    assert runs.set_index("trial").loc["trial_00", "images_per_sec"] == 1100.0
    assert len(analysis.full_budget(runs)) == len(SEARCH)


def test_factor_table_means_and_intervals(search_report):
    factors = table(search_report, "factors", dtype={"value": str}).set_index(["factor", "value"])
    depth = factors.loc["model.depth"]
    for d in (2, 4, 6):
        planted = np.array([t["final"] for t in SEARCH if t["model.depth"] == d])
        half = T_975[3] * planted.std(ddof=1) / np.sqrt(4)
        row = depth.loc[str(d)]
        assert row.n == 4 and row.n_early_stopped == 1
        assert row["mean"] == pytest.approx(planted.mean())
        assert (row.ci_low, row.ci_high) == pytest.approx((planted.mean() - half,
                                                           planted.mean() + half))
        assert row.best == pytest.approx(planted.max())


def test_early_stopped_trials_never_mix_with_final_accuracies(search_report):
    factors = table(search_report, "factors")
    assert factors.n.sum() == 3 * len(SEARCH)  # each full-budget trial once per factor
    assert factors["mean"].min() > 0.3  # the early-stopped 0.05s would drag a mean down
    best = table(search_report, "best")
    assert not best.trial.str.startswith("trial_es").any()
    assert best.val_acc.is_monotonic_decreasing and best.trial.iloc[0] == "trial_11"
    # fewest parameters (depth) first, each the most accurate trial of its depth
    assert table(search_report, "pareto").trial.tolist() == ["trial_03", "trial_07", "trial_11"]


def test_importance_ranks_the_planted_factor_first(search_report):
    importance = table(search_report, "importance")
    assert importance.factor.iloc[0] == "model.depth"
    assert importance.importance.iloc[0] > 0.9


def test_too_few_trials_gives_no_importance_instead_of_crashing(store):
    runs = analysis.load_runs(store, "search")
    few = runs[runs.trial < "trial_07"]  # 7 full-budget trials
    assert analysis.importances(few, ["model.depth", "model.heads"]).empty
    assert not analysis.importances(runs, ["model.depth", "model.heads"]).empty


def test_ablation_effects_with_paired_intervals(ablation_report):
    effects = table(ablation_report, "ablation", index_col="cell")
    assert effects.index[0] == "baseline" and effects.loc["baseline", "verdict"] == "baseline"
    base = effects.loc["baseline"]
    assert base["mean"] == pytest.approx(0.72)
    assert (base.ci_low, base.ci_high) == pytest.approx((0.72 - T_975[2] * 0.02 / np.sqrt(3),
                                                         0.72 + T_975[2] * 0.02 / np.sqrt(3)))

    lower = effects.loc["model.pos_embedding=none"]
    diffs = np.array([-0.04, -0.05, -0.04])
    half = T_975[2] * diffs.std(ddof=1) / np.sqrt(3)
    assert lower.test == "paired t" and lower.n_compared == 3
    assert lower["diff"] == pytest.approx(diffs.mean())
    assert (lower.diff_low, lower.diff_high) == pytest.approx((diffs.mean() - half,
                                                               diffs.mean() + half))
    assert lower.verdict == "lowers val_acc"
    assert "interval spans zero" in effects.loc["model.pool=mean", "verdict"]
    assert "too few seeds" in effects.loc["model.pool=mean", "verdict"]
    assert effects.loc["model.pos_embedding=rope2d", "verdict"].startswith("too few seeds")


def test_a_confirmation_without_factors_reports_its_accuracy_over_seeds(store, tmp_path):
    out = build(["confirm"], store, tmp_path / "confirm")
    effects = table(out, "ablation", index_col="cell")
    assert effects.index.tolist() == ["baseline"]
    base = effects.loc["baseline"]
    assert (base["mean"], base.n) == (pytest.approx(0.79), 3)
    assert (base.ci_low, base.ci_high) == pytest.approx((0.79 - T_975[2] * 0.01 / np.sqrt(3),
                                                         0.79 + T_975[2] * 0.01 / np.sqrt(3)))
    assert base.test_acc_mean == pytest.approx(0.78)  # log_trial's test_acc: final val - 0.01
    assert "searched: nothing" in (out / "report.html").read_text()
    best = table(out, "best")  # every trial is the one configuration: its mean, not a lucky seed
    assert list(best.config_val_acc) == pytest.approx([0.79] * 3)
    assert list(best.config_trials) == [3] * 3


def test_welch_test_when_seeds_do_not_pair(store):
    runs = analysis.load_runs(store, "ablation")
    cell = runs.cell == "model.pos_embedding=none"
    runs.loc[cell, "train.seed"] += 10
    row = analysis.ablation_effects(runs).loc["model.pos_embedding=none"]
    assert row.test == "Welch t"
    assert row["diff"] == pytest.approx(np.mean([0.66, 0.67, 0.70]) - 0.72)


def test_every_figure_is_a_png(search_report, ablation_report):
    for out, names in [(search_report, ["factors", "curves_best", "cost", "importance",
                                        "attention"]),
                       (ablation_report, ["factors", "ablation", "curves_best", "curves_cells",
                                          "cost"])]:
        for name in names:
            assert_png(out / "figures" / f"{name}.png")
        assert (out / "report.ipynb").is_file()
        assert "<html" in (out / "report.html").read_text()


def test_missing_checkpoint_is_said_not_crashed(ablation_report):
    assert not (ablation_report / "figures" / "attention.png").exists()
    assert "logged no checkpoint/model.pt" in (ablation_report / "report.html").read_text()


def test_learning_curves_average_seeds(ablation_report):
    curves = table(ablation_report, "curves_cells")
    last = curves[(curves.group == "baseline") & (curves.epoch == EPOCHS)].iloc[0]
    assert last.n == 3 and last["mean"] == pytest.approx(0.72)
    assert curves[curves.group == "baseline"].epoch.tolist() == [1, 2, 3]


def test_rebuild_gives_identical_tables_and_removes_only_its_own_files(store, ablation_report,
                                                                       tmp_path):
    """A build into a folder that holds a previous build and the user's own files: what the
    previous build wrote and this one does not is gone, the user's files are not."""
    shutil.copytree(ablation_report, tmp_path / "again")
    mine = [tmp_path / "again" / name for name in ("notes.txt", "figures/mine.png",
                                                    "tables/mine.csv", "data/keep.csv")]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    stale = tmp_path / "again" / "tables" / "dropped_section.csv"
    stale.write_text("written by the previous build")
    manifest = tmp_path / "again" / ".report-files"
    manifest.write_text(manifest.read_text() + "tables/dropped_section.csv\n")
    again = build(["ablation"], store, tmp_path / "again")
    assert all(path.read_text() == "the user's" for path in mine) and not stale.exists()
    assert "tables/dropped_section.csv" not in (again / ".report-files").read_text()
    names = sorted(p.name for p in (ablation_report / "tables").glob("*.csv"))
    assert "importance.csv" in names  # the forest is seeded
    assert names == sorted(p.name for p in (again / "tables").glob("*.csv") if p != mine[2])
    for name in names:
        assert (again / "tables" / name).read_bytes() == \
            (ablation_report / "tables" / name).read_bytes(), name


def test_a_running_study_has_no_final_accuracies_yet(store):
    runs = analysis.load_runs(store, "running")
    assert analysis.full_budget(runs).empty and analysis.best_trials(runs).empty
    depth = analysis.factor_table(runs, "model.depth")
    assert depth.n.tolist() == [0] and depth.n_early_stopped.tolist() == [1]
    assert analysis.pareto_front(runs).empty
    assert analysis.importances(runs, ["model.depth"]).empty
    assert analysis.study_summary(runs)["status: running"] == 2
    # an integer key a trial lacks stays an integer: 500, not 500.0
    assert runs["data.subset"].dtype == "Int64" and runs["data.subset"].tolist()[:2] == [pd.NA,
                                                                                       500]


def test_comparison_side_by_side(store, tmp_path):
    out = build(["search", "ablation", "running"], store, tmp_path / "cmp")
    factors = table(out, "factors")
    pos = factors[factors.factor == "model.pos_embedding"]
    assert set(pos.study) == {"search", "ablation", "running"}
    summary = table(out, "summary", index_col=0)
    assert list(summary.columns) == ["search", "ablation", "running"]
    assert_png(out / "figures" / "factor_model.pos_embedding.png")
    assert_png(out / "figures" / "ablation.png")


def test_unknown_experiment_fails_in_one_line(store):
    done = run_cli("--experiment", "nope", "--tracking-uri", store)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: no experiment named 'nope' at {store}"]


@pytest.mark.parametrize("experiment, missing", [("empty", "has no trial runs"),
                                                 ("parent-only", "has no trial runs"),
                                                 ("no-metric", "metric 'val_acc'")])
def test_unusable_experiment_exits_2_naming_what_is_missing(store, capsys, experiment, missing):
    assert main(["--experiment", experiment, "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and missing in err[0]


def test_tracking_uri_is_required(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--experiment", "search"]) == 2
    assert "MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_readme_results_are_written_from_report_tables(tmp_path):
    from reports.readme import main as readme_main
    for name, tables in {
        "search": {"best": "trial,model.depth,val_acc,test_acc,run_id\nt1,4,0.61234,0.6,r\n"},
        "search2": {"best": "trial,model.pool,val_acc,test_acc,run_id\nt9,seq,0.7,0.71,r\n"},
        "abl": {"ablation": "cell,n,mean,ci_low,ci_high,diff,diff_low,diff_high,p_value,verdict\n"
                            "baseline,3,0.5,0.48,0.52,,,,,baseline\n"
                            "model.pos_embedding=none,3,0.45,0.43,0.47,-0.05,-0.07,-0.03,0.01,"
                            "worse than baseline\n"
                            "model.depth=2,1,0.47,,,-0.03,,,,too few seeds to tell (n=1 < 3)\n",
                "factors": "factor,value,n\nmodel.pos_embedding,none,3\n"}}.items():
        (tmp_path / name / "tables").mkdir(parents=True)
        (tmp_path / name / "tables" / "summary.csv").write_text(
            f",{name}\ntrials,5\nfull-budget trials,3\nmax epochs,4\n"
            "compute hours (sum of epoch_seconds),0.25\n")
        for table, text in tables.items():
            (tmp_path / name / "tables" / f"{table}.csv").write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    tables = ["--search", str(tmp_path / "search"), "--search", str(tmp_path / "search2"),
              "--ablation", str(tmp_path / "abl"), "--readme", str(readme)]
    readme_main([*tables, "--preface", "What the runs were."])
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert "| t1 | 4 | 0.6123 | 0.6000 |" in text
    assert text.index("What the runs were.") < text.index("| t1 |") < text.index("| t9 | seq |")
    readme_main(tables)  # again, tables rebuilt: the preface written by hand is kept, once
    assert readme.read_text() == text
    assert "| model.pos_embedding=none | 3 | 0.4500 [0.4300, 0.4700] | -0.0500 [-0.0700, -0.0300]" \
        in text and "**Ablation** (`abl`" in text
    # one seed has no interval: said, not printed as [nan, nan]
    assert "| model.depth=2 | 1 | 0.4700 (one seed: no interval) |  |  | too few seeds" in text


def test_readme_calls_an_ablation_without_factors_a_confirmation_with_its_test_accuracy(
        store, tmp_path):
    from reports.readme import main as readme_main
    out = build(["confirm"], store, tmp_path / "confirm")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    readme_main(["--ablation", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "**Confirmation** (`confirm`" in text
    rows = [line for line in text.splitlines() if line.startswith("| baseline |")]
    assert rows == ["| baseline | 3 | 0.7900 [0.7652, 0.8148] | 0.7800 |"]  # val, then test
    assert "| configuration | seeds |" in text and "diff to baseline" not in text
    (out / "tables" / "ablation.csv").unlink()  # as a study with no final accuracy leaves it
    readme_main(["--ablation", str(out), "--readme", str(readme)])
    assert "none at its full budget yet" in readme.read_text()


def shown_tables(html: str) -> list[pd.DataFrame]:
    """The tables of a report's HTML as a reader sees them: every cell the text shown."""
    tables = []
    for node in BeautifulSoup(html, "html.parser").find_all("table", class_="dataframe"):
        header = [th.get_text(strip=True) for th in node.thead.find("tr").find_all("th")]
        rows = [[td.get_text(strip=True) for td in tr.find_all("td")]
                for tr in node.tbody.find_all("tr")]
        # index cells span rows, so each row is matched to the header from the right
        width = max(map(len, rows), default=0)
        tables.append(pd.DataFrame(rows, columns=header[len(header) - width:]))
    return tables


COUNTS = ("n", "n_params", "n_compared", "n_early_stopped", "trials", "budget", "epoch")
SOURCE_LINES = ("import pandas as pd", "from reports import analysis", "save_table(")


def test_report_html_shows_outputs_not_code(search_report, ablation_report):
    for out, study in ((search_report, "search"), (ablation_report, "ablation")):
        html = (out / "report.html").read_text()
        body = BeautifulSoup(html, "html.parser").body
        assert not body.select(".jp-CodeCell .jp-InputArea, .highlight"), out
        assert not any(line in body.get_text() for line in SOURCE_LINES), out
        assert shown_tables(html) and "<img" in html  # the outputs are all still there
        assert body.parent.title.get_text() == study  # the page's title
        notebook = (out / "report.ipynb").read_text()  # the notebook keeps the code
        assert all(line in notebook for line in SOURCE_LINES)


def test_counts_print_as_integers(search_report, ablation_report):
    """Parameter counts come from MLflow as floats, and a count column with a gap turns float
    in pandas: neither may show as 6000.0, in the report or in its tables."""
    for out, depths in ((search_report, (2, 4, 6)), (ablation_report, (1,))):
        html = shown_tables((out / "report.html").read_text())
        saved = [pd.read_csv(p, dtype=str, keep_default_na=False)
                 for p in (out / "tables").glob("*.csv")]
        checked = 0
        for shown in html + saved:
            for col in [c for c in shown.columns if c in COUNTS]:
                values = shown[col][~shown[col].isin(["", "<NA>", "all"])]
                assert values.str.fullmatch(r"\d+").all(), (out, col, values.tolist())
                checked += len(values)
        assert checked > 20
        best = next(t for t in html if "n_params" in t and "trial" in t)
        assert set(best.n_params) <= {str(1000 * d) for d in depths}  # as log_trial logs them
    summary = table(search_report, "summary", index_col=0, dtype=str).iloc[:, 0]
    assert summary["trials"] == str(len(SEARCH) + 4)
    paired = table(ablation_report, "ablation", index_col="cell", dtype=str).n_compared.dropna()
    assert paired.to_dict() == {cell: str(len(seeds.keys() & ABLATION["baseline"].keys()))
                                for cell, seeds in ABLATION.items() if cell != "baseline"}


def test_the_study_run_is_not_a_trial(store, search_report):
    """The runner's parent run of a study carries the study's tags but no trial id: it must
    not be counted, ranked or charted as a trial."""
    runs = analysis.load_runs(store, "search")
    assert runs[contract.TRIAL_ID].notna().all() and "search" not in set(runs.trial)
    summary = table(search_report, "summary", index_col=0).iloc[:, 0]
    assert int(summary["trials"]) == len(SEARCH) + 4
    assert float(summary["best val_acc"]) == pytest.approx(max(t["final"] for t in SEARCH))
    html = (search_report / "report.html").read_text()
    assert f"{len(SEARCH) + 4} trials, {len(SEARCH)} at full budget" in html


def test_reports_name_no_folder_of_the_machine(store, search_report, ablation_report,
                                              tmp_path_factory):
    """The store and the output folder lie outside the repository here: the saved report shows
    them by name, and nothing under the test's temporary folder or the repository's path."""
    machine = [str(tmp_path_factory.getbasetemp()), str(ROOT)]
    for out in (search_report, ablation_report):
        for name in ("report.html", "report.ipynb"):
            text = (out / name).read_text()
            assert not [p for p in machine if p in text], (out, name)
        assert "sqlite:///\N{HORIZONTAL ELLIPSIS}/mlflow.db" in (out / "report.html").read_text()
    assert str(store).startswith("sqlite:///" + machine[0])  # else this test checks nothing


def test_paths_in_the_repository_are_shown_relative():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        f"at sqlite:///{ROOT}/runs/x/mlflow.db, out {ROOT}/reports/out/x; {ROOT}2/y; "
        f"/srv{ROOT}/z")])
    text = without_local_paths(notebook, [ROOT / "runs/x/mlflow.db"]).cells[0].source
    assert text == f"at sqlite:///runs/x/mlflow.db, out reports/out/x; {ROOT}2/y; /srv{ROOT}/z"
