"""Proof that raw data never leaves a site: every message the ClientApps send during a real run is
captured as the ServerApp receives it, and holds only model arrays and numeric metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from common.config import load_federation_config
from common.model import build_unet, trainable_state
from server.simulation import run_simulation
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

REPO = Path(__file__).resolve().parents[2]

# A ServerApp that runs fedsynth's own main with a Grid that records every reply it receives.
CAPTURE_APP = '''
import json, os
from flwr.serverapp import ServerApp
from server import server_app as fedsynth_server

app = ServerApp()


def _describe(reply):
    if reply.has_error():
        return {"error": reply.error.reason}
    content = reply.content
    return {
        "type": reply.metadata.message_type,
        "arrays": {name: {k: [list(a.shape), a.dtype] for k, a in rec.items()} for name, rec in content.array_records.items()},
        "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
        "configs": {name: dict(rec) for name, rec in content.config_records.items()},
    }


class RecordingGrid:
    def __init__(self, grid, path):
        self._grid, self._path = grid, path

    def send_and_receive(self, messages, *args, **kwargs):
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        with open(self._path, "a") as handle:
            for reply in replies:
                handle.write(json.dumps(_describe(reply), default=str) + "\\n")
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


@app.main()
def main(grid, context):
    fedsynth_server.main(RecordingGrid(grid, os.environ["FEDSYNTH_CAPTURE_FILE"]), context)
'''


def _capture_app(tmp_path: Path) -> Path:
    app = tmp_path / "capture-app"
    for package in ("common", "client", "server"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__", "demo_data"))
    shutil.copy(REPO / "LICENSE", app / "LICENSE")
    pyproject = (REPO / "pyproject.toml").read_text().replace('serverapp = "server.server_app:app"', 'serverapp = "capture_app:app"')
    (app / "pyproject.toml").write_text(pyproject)
    (app / "capture_app.py").write_text(CAPTURE_APP)
    return app


def test_only_weights_and_numbers_leave_the_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_a = write_shapes_dataset(tmp_path / "data-a", per_class=8, seed=1)
    data_b = write_shapes_dataset(tmp_path / "data-b", per_class=8, seed=2)
    (data_b / "disc" / "broken.png").write_bytes(b"not a png")  # a bad file must not leak its name either
    sites = [write_site(tmp_path / "sites", "site-a", data_a),
             write_site(tmp_path / "sites", "site-b", data_b, skip_bad_files=True)]
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={"num_rounds": 1, "evaluate_every": 1})))
    cfg = load_federation_config(fed_path)
    capture = tmp_path / "capture.jsonl"
    monkeypatch.setenv("FEDSYNTH_CAPTURE_FILE", str(capture))

    run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False, app=_capture_app(tmp_path))

    torch.manual_seed(0)
    model = {k: [list(v.shape), "float32"] for k, v in trainable_state(build_unet(cfg.model)).items()}
    replies = [json.loads(line) for line in capture.read_text().splitlines()]
    assert sorted(r["type"] for r in replies) == ["evaluate", "evaluate", "train", "train"]
    file_names = {p.name for p in [*data_a.rglob("*"), *data_b.rglob("*")]} | {p.stem for p in data_b.rglob("*.png")}
    for reply in replies:
        assert "error" not in reply, reply
        assert set(reply["configs"]) == {"site"}
        assert reply["configs"]["site"] in ({"site-id": "site-a"}, {"site-id": "site-b"})
        for metrics in reply["metrics"].values():
            assert all(isinstance(v, (int, float)) for v in metrics.values()), metrics
        if reply["type"] == "train":
            assert reply["arrays"] == {"arrays": model}  # exactly the global model's keys, shapes and dtype
            # No training loss under DP: it is computed without noise, so epsilon does not cover it.
            assert set(reply["metrics"]["metrics"]) == {"num-examples", "epsilon", "delta", "steps", "val-loss",
                                                       "val-num-examples"}
        else:
            assert set(reply["metrics"]["metrics"]) == {"num-examples", "val-loss"}
            assert reply["arrays"] == {}
        text = json.dumps(reply)
        assert str(tmp_path) not in text
        assert not any(name in text for name in file_names if len(name) > 4)
