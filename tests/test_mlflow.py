"""MLflow as its users expect it, read back through MlflowClient from a real `mlflow server`:
the study a parent run with its trials as children, runs named for what they are, the data set
an input of every run, the best model logged, registered and loadable."""
import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from studyutil import env_without_tracking, experiment, run, write
from tinyvit.config import Config
from tinyvit.data import load_arrays


@pytest.mark.study
def test_a_study_in_mlflow_as_its_users_expect(tmp_path, mlflow_server, ray_head, monkeypatch):
    server = mlflow_server
    d = experiment(tmp_path, name="looks", mode="ablation", search=None,
                   scheduler={"type": "none"})
    d["ablation"] = {"factors": {"model.depth": [2, 1]}, "seeds": [0]}
    d["train"]["epochs"] = 1
    out = run(write(tmp_path, d), "--tracking-uri", server, "--address", ray_head.address,
              env=env_without_tracking())
    client = MlflowClient(server)
    exp = client.get_experiment_by_name("looks")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 2 and len(runs) == 3
    parent = parents[0]
    assert parent.info.run_name == "looks" and parent.info.status == "FINISHED"
    assert parent.data.params["model.depth"] == "2"  # the fixed config of the study
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert sorted(r.info.run_name for r in trials) == ["baseline seed 0", "model.depth=1 seed 0"]
    for r in trials:  # the checkpoints, through the server's artifact store
        assert [a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")] == \
            ["checkpoint/model.pt"]
    assert not (tmp_path / "runs" / "looks" / "mlflow.db").exists()  # no store of its own

    # the data set: one digest, on the study's run and on every trial's
    digests = {i.dataset.digest for r in [parent, *trials] for i in r.inputs.dataset_inputs}
    names = {i.dataset.name for r in [parent, *trials] for i in r.inputs.dataset_inputs}
    assert len(digests) == 1 and names == {"synthetic"}
    assert all(len(r.inputs.dataset_inputs) == 1 for r in [parent, *trials])

    # the best trial's model: registered, loadable, and it scores what the trial reported
    table = pd.read_parquet(tmp_path / "runs" / "looks" / "trials.parquet")
    best = table.sort_values("val_acc", ascending=False).iloc[0]
    versions = client.search_model_versions("name = 'looks'")
    assert len(versions) == 1
    best_run = next(r for r in trials if r.data.tags["trial_id"] == best["trial_id"])
    assert versions[0].run_id == best_run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # set_tracking_uri exports it: undone after
    mlflow.set_tracking_uri(server)
    model = mlflow.pytorch.load_model("models:/looks/1").eval()
    info = mlflow.models.get_model_info("models:/looks/1")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    cfg = Config.from_dict({"data": d["data"]})
    arrays = load_arrays(cfg.data)
    mean = torch.tensor(info.metadata["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info.metadata["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((arrays.test_x.float() / 255 - mean) / std)
    accuracy = (logits.argmax(1) == arrays.test_y).float().mean().item()
    assert accuracy == pytest.approx(best["test_acc"], abs=1 / len(arrays.test_y))
    assert "registry  looks version 1" in out  # (the attached report: the smoke study's test)
