"""Run reports (report.png from metrics.jsonl) and the trackers of training.report_to."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_bert_recipe

import toolkit
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError
from toolkit.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image(path):
    """(width, height, distinct colours) of a PNG, read back by PIL and by matplotlib."""
    import matplotlib.image
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        width, height = im.size
        colours = len(set(im.convert("RGB").getdata()))
    assert matplotlib.image.imread(str(path)).shape[:2] == (height, width)
    return width, height, colours


def _write_metrics(folder, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_of_a_pretraining_run(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(tmp_path / "run", corpus_dir, wordpiece_dir, max_steps=4, eval_steps=2)
    out = toolkit.pretrain(recipe).output_dir
    rows = read_metrics(out)
    assert any("eval_loss" in r and "train_flops" in r for r in rows)  # validation loss against compute
    path = write_report(out)
    assert path == out / "report.png"
    width, height, colours = _image(path)
    assert (width, height) == (1200, 700)  # four panels: loss, learning rate, throughput, loss vs FLOPs
    assert colours > 20  # curves and text, not a blank canvas


def test_report_of_a_finetuning_like_run_and_of_eval_only_metrics(tmp_path):
    train = [
        {"step": s, "loss": 0.7 - 0.01 * s, "learning_rate": 1e-3 * (1 - s / 30), "tokens_per_second": 900.0 + s}
        for s in range(1, 31)
    ]
    evals = [{"step": 0, "eval_loss": 0.69, "eval_accuracy": 0.5}, {"step": 30, "eval_loss": 0.4, "eval_accuracy": 0.8}]
    _write_metrics(tmp_path / "ft", [evals[0], *train, evals[1]])
    assert _image(write_report(tmp_path / "ft"))[:2] == (1200, 700)  # three panels in two rows (no FLOPs)

    _write_metrics(tmp_path / "eval-only", [evals[1]])
    assert _image(write_report(tmp_path / "eval-only"))[:2] == (1200, 350)  # the loss panel alone


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        write_report(tmp_path)
    _write_metrics(tmp_path, [])
    with pytest.raises(ToolkitError, match="holds no rows"):
        write_report(tmp_path)
    assert not (tmp_path / "report.png").exists()


def test_report_to_accepts_accelerates_trackers_and_refuses_unknown_or_missing_ones(monkeypatch):
    import accelerate.tracking
    import accelerate.utils

    from toolkit.config import TrainingArgs
    from toolkit.engine.tracking import TRACKERS

    assert set(TRACKERS) == set(accelerate.tracking.LOGGER_TYPE_TO_CLASS)  # every tracker accelerate has
    with pytest.raises(ToolkitError, match="unknown training.report_to 'mlflw'.*did you mean 'mlflow'"):
        TrainingArgs(report_to=["mlflw"]).validate()
    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    with pytest.raises(ToolkitError, match="pip install comet-ml"):
        TrainingArgs(report_to=["tensorboard", "comet_ml"]).validate()
    TrainingArgs(report_to=["tensorboard", "mlflow"]).validate()


def test_mlflow_tracker_logs_the_run_to_a_local_file_store(tmp_path, monkeypatch, corpus_dir, wordpiece_dir):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise (offline: a folder)
    recipe = tiny_bert_recipe(tmp_path / "run", corpus_dir, wordpiece_dir, max_steps=3, report_to=["mlflow"])
    out = toolkit.pretrain(recipe).output_dir

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    expected = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(logged) == [1, 2, 3]
    assert logged == pytest.approx(expected, rel=1e-6)
    flops = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_flops")}
    assert flops[3] == pytest.approx(next(r["train_flops"] for r in read_metrics(out) if r.get("step") == 3))
    assert run.data.params["training.max_steps"] == "3"  # the resolved recipe as run parameters
    assert run.info.status == "FINISHED"
