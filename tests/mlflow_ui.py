"""What the MLflow UI shows of a rehearsed jobs/paper.yaml, read through the tracking server's REST API
(tests/test_verbatim.py, tests/test_rehearsal.py)."""
import os


def check_what_the_ui_shows(uri: str, experiment: str) -> None:
    """Through the server's REST API: the parent and its children, the group-by keys on every child,
    the verdicts as metrics, the contrast table artifact, and the eval_at points as metric steps."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags["valind.kind"] == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    for c in children:  # "Group by condition" aggregates seeds: params and tags on every child
        for key in ("model", "condition", "value", "seed"):
            assert key in c.data.params and f"valind.{key}" in c.data.tags, (c.info.run_name, key)
    value = next(c for c in children if c.data.tags["valind.kind"] == "value")
    cond = value.data.params["condition"]
    verdict = f"verdict/{value.data.params['model']}/{cond}/safety/refusal/effect"
    assert verdict in parent.data.metrics and "verdict/safety/refusal/effect" in value.data.metrics
    assert value.data.metrics["verdict/safety/refusal/effect"] == parent.data.metrics[verdict]
    # load_table searches the runs through the fluent API, whose URI (and MLFLOW_TRACKING_URI, which
    # set_tracking_uri also sets) must not outlive this check: later tests would track to this server
    previous = mlflow.get_tracking_uri() if "MLFLOW_TRACKING_URI" in os.environ else None
    mlflow.set_tracking_uri(uri)
    try:
        table = client.load_table(exp.experiment_id, "verdicts/contrasts.json", run_ids=[parent.info.run_id])
    finally:
        mlflow.set_tracking_uri(previous)
    row = table[(table["condition"] == cond) & (table["metric"] == "refusal") & table["primary"]
                & (table["reference"] == "control")]
    assert len(row) == 1 and abs(row["effect"].iloc[0] - parent.data.metrics[verdict]) < 1e-8  # JSON: 10 digits
    # train.eval_at [0.25, 0.5, 1.0]: the run's metric at steps 25, 50 and 100 (its path in the chart view)
    hist = client.get_metric_history(value.info.run_id, "safety/refusal/strmatch")
    assert sorted(m.step for m in hist) == [25, 50, 100]
