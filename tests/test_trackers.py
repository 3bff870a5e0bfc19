"""`log.to`: metrics.jsonl plus the same scalars in every chosen tracker, offline."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from multipromot.config import load_config
from multipromot.errors import UserError
from multipromot.train import common
from multipromot.train.common import MetricsLogger, check_trackers
from multipromot.train.metrics_log import MetricsLog

RECORDS = [
    ({"step": 10, "loss": 2.5, "lr": 0.3, "tokens_per_s": 1200}, 10),
    ({"step": 20, "loss": 1.75, "lr": 0.3, "tokens_per_s": 1300}, 20),
    ({"step": 20, "task": "lab_rte", "val_loss": 1.5, "val_score": 50.0}, 20),
    ({"event": "done", "best_step": 20}, None),  # no step: metrics.jsonl only
]


def _log_all(logger: MetricsLogger) -> None:
    for record, step in RECORDS:
        logger.log(record, step=step)
    logger.close()


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """What every tracker must hold: metrics.jsonl's numbers (not `step`), by step."""
    want: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" not in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                want.setdefault(key, {})[record["step"]] = float(value)
    return want


def _tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {
        tag: {e.step: pytest.approx(e.value) for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
    }


def test_default_is_tensorboard_with_the_scalars_of_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    _log_all(MetricsLogger(out))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(RECORDS)
    assert _tensorboard_scalars(out) == _expected(out)
    assert load_config(None, []).log.to == ["tensorboard"]


def _wandb_history(run_file: Path) -> dict[str, dict[int, float]]:
    """The history rows of an offline run file, once wandb's service process has written its
    last ("exit") record: ``run.finish()`` returns before that process has flushed the file."""
    for _ in range(100):
        rows, complete = _read_wandb_file(run_file)
        if complete:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{run_file} has no exit record after 10 s")


def _read_wandb_file(run_file: Path) -> tuple[dict[str, dict[int, float]], bool]:
    """(history rows, whether the exit record is there) of a LevelDB-style log of protobuf
    records, the format of wandb's offline run files."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    complete = False
    assert data[:4] == b":W&B"
    block, pos, partial, rows = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # padding, or a record still being written
            break
        partial += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(partial)
            partial = b""
            complete = complete or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):
                        rows.setdefault(key, {})[step] = pytest.approx(value)
    return rows, complete


def test_wandb_offline_gets_the_same_scalars_as_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    _log_all(MetricsLogger(out, trackers=["tensorboard", "wandb"]))
    [run_file] = (tmp_path / "wandb").rglob("run-*.wandb")
    expected = _expected(out)
    assert _wandb_history(run_file) == expected
    assert _tensorboard_scalars(out) == expected


def test_mlflow_local_file_store_gets_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    _log_all(MetricsLogger(out, trackers=["mlflow"]))
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("multipromot").experiment_id])
    got = {
        key: {
            m.step: pytest.approx(m.value) for m in client.get_metric_history(run.info.run_id, key)
        }
        for key in run.data.metrics
    }
    assert got == _expected(out)


def test_unknown_or_missing_trackers_are_one_line_errors_naming_the_key(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="unknown tracker 'comet'") as e:
        MetricsLogger(tmp_path, trackers=["tensorboard", "comet"])
    assert e.value.key == "log.to"
    monkeypatch.setitem(common._TRACKER_MODULES, "trackio", "no_such_module_for_trackio")
    with pytest.raises(UserError, match="trackio is not installed") as e:
        check_trackers(["trackio"], file="run.yaml")
    assert (e.value.key, e.value.file) == ("log.to", "run.yaml")
    # refused on every rank, before anything is written
    with pytest.raises(UserError):
        MetricsLogger(tmp_path / "rank1", enabled=False, trackers=["trackio"])
    assert not (tmp_path / "rank1").exists()


def test_log_to_is_a_config_key(tmp_path):
    cfg = load_config(None, ["log.to=[tensorboard,wandb]"])
    assert check_trackers(cfg.log.to) == ["tensorboard", "wandb"]
    with pytest.raises(UserError):
        load_config(None, ["log.too=[wandb]"])


def test_metrics_log_gives_the_logged_training_losses_in_step_order(tmp_path):
    """The report's loss panel reads what the logger wrote: training losses only (not the
    validation records), a step logged again by a resumed run once, a torn last line skipped."""
    logger = MetricsLogger(tmp_path, trackers=[])
    for step, loss in ((5, 2.0), (10, 1.5)):
        logger.log({"stage": 2, "step": step, "loss": loss, "lr": 0.1}, step=step)
        logger.log({"stage": 2, "step": step, "val_loss": 9.0}, step=step)
    logger.log({"stage": 2, "step": 10, "loss": 1.4}, step=10)  # the resumed run's step 10
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": 2, "step": 15, "lo')
    assert MetricsLog(tmp_path).losses() == [(5, 2.0), (10, 1.4)]
    assert MetricsLog(tmp_path / "nothing").losses() == []


def test_metrics_log_trim_keeps_earlier_steps_and_other_stages_and_drops_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (0, 10, 20, 30):
        log.append({"stage": 1, "step": step, "loss": 1.0})
    log.append({"stage": 2, "step": 40, "loss": 2.0})
    with log.path.open("a") as f:
        f.write('{"stage": 1, "step": 40, "lo')  # a kill mid-write
    log.trim(20, stage=1)
    assert [(r["stage"], r["step"]) for r in log.records()] == [(1, 0), (1, 10), (1, 20), (2, 40)]
    assert log.path.read_text().endswith("}\n")  # the torn line is gone, not only skipped
    log.trim(0, stage=1)  # starting over: none of stage 1's records stay
    assert [(r["stage"], r["step"]) for r in log.records()] == [(2, 40)]
