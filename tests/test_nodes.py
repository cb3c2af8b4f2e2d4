"""Node-local data (fedengines/nodes.py) and the Flower engine's side of a deployment that needs no servers: what a node
decodes and refuses, what the server builds without data, the state's transport, and how the ServerApp reports
refused, failed and lost nodes (a fake Grid stands for the SuperLink)."""
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fedengines import flower_app
from fedengines import nodes
import readers
from data import DataConfig, DataError
from engine import PretrainConfig
from fedengines.flower_app import FlowerEngine, FlowerError, enlist, pack, unpack
from models import build_model
from fedengines.nodes import NodeDataError, NodeFederation, input_shapes, load_node, node_clients, write_demo_node

CPU = torch.device("cpu")
SMALL = DataConfig(n_mels=32, win_ms=40.0, hop_ms=20.0)


def _cfg(tmp_path, **data) -> PretrainConfig:
    return PretrainConfig(data=DataConfig(**{**SMALL.__dict__, "cache_dir": str(tmp_path / "cache"), **data}))


def test_a_node_folder_is_decoded_to_the_configs_inputs_once(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    root = write_demo_node(tmp_path / "site", cfg.data, images=10, clips=6, seed=1)
    data = load_node(root, cfg.data, CPU)
    shapes = input_shapes(cfg.data)
    assert {m: md.shape for m, md in data.items()} == shapes and shapes["image"] == (1, 28, 28)
    files = sorted((root / "images").rglob("*.png"))
    pixels = np.stack([np.asarray(Image.open(f))[None] for f in files])
    assert torch.equal(data["image"].train_x, torch.from_numpy(pixels))  # every file, in sorted order, unchanged
    x = pixels / 255.0
    assert torch.allclose(data["image"].mean, torch.tensor([x.mean()], dtype=torch.float32))
    assert torch.allclose(data["image"].std, torch.tensor([x.std(ddof=1)], dtype=torch.float32), rtol=1e-4)
    logmel = data["audio"].train_x.double()
    assert abs(float(data["audio"].mean) - logmel.mean().item()) < 1e-3 and len(logmel) == 6
    # a second load maps the cached samples: no file is decoded again
    monkeypatch.setattr(readers, "read_image", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(readers, "read_audio", lambda *a, **k: pytest.fail("decoded again"))
    again = load_node(root, cfg.data, CPU)
    assert torch.equal(again["image"].train_x, data["image"].train_x)
    assert torch.equal(again["audio"].train_x, data["audio"].train_x)
    disk = load_node(root, _cfg(tmp_path, residency="disk").data, CPU)  # any tier: the same samples
    assert disk["image"].residency == "disk" and torch.equal(disk["image"].train_x, data["image"].train_x)


def test_a_node_decodes_to_the_runs_channels_and_side(tmp_path):
    small = _cfg(tmp_path).data  # 28 px grayscale files ...
    root = write_demo_node(tmp_path / "site", small, images=4, seed=2)
    big = root / "images" / "class0" / "big.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(big)
    i = sorted((root / "images").rglob("*.png")).index(big)  # the files are read in sorted order
    cfg = _cfg(tmp_path, dataset="cifar10+esc50", modalities=("image",))  # ... for a run on 32 px RGB
    x = load_node(root, cfg.data, CPU)["image"].train_x
    assert tuple(x.shape) == (5, 3, 32, 32)
    assert x[i, :, 16, 16].tolist() == [200, 10, 10]  # resized and cropped, still red
    j = 1 - min(i, 1)
    assert torch.equal(x[j, 0], x[j, 1]) and torch.equal(x[j, 1], x[j, 2])  # a grayscale file: three equal channels


def test_a_node_that_cannot_train_is_refused_with_a_line_naming_its_folder(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(NodeDataError, match="started without its data: .*--node-config 'data-root="):
        nodes.node_root({})
    with pytest.raises(NodeDataError, match=f"data-root {tmp_path / 'nowhere'}: no such folder"):
        load_node(tmp_path / "nowhere", cfg.data, CPU)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(NodeDataError, match=r"empty: nothing to train on \(images/ with no image files\)"):
        load_node(tmp_path / "empty", cfg.data, CPU)
    bad = tmp_path / "corrupt" / "images"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(NodeDataError, match=f"data-root {tmp_path / 'corrupt'}: images/: .*"):
        load_node(tmp_path / "corrupt", cfg.data, CPU)
    audio_only = write_demo_node(tmp_path / "audio_only", cfg.data, clips=4)
    with pytest.raises(NodeDataError, match="holds only audio but the run trains image"):
        load_node(audio_only, _cfg(tmp_path, modalities=("image",)).data, CPU)
    few = write_demo_node(tmp_path / "few", cfg.data, images=8)
    with pytest.raises(NodeDataError, match=r"8 image samples, fewer than one batch \(optim.batch_size=256\)"):
        node_clients(cfg, few, CPU)


def test_a_node_trains_its_data_as_the_client_id_the_server_gave_it(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.optim.batch_size = cfg.optim.batch_size_audio = 8
    c = node_clients(cfg, write_demo_node(tmp_path / "site", cfg.data, images=16, clips=8, seed=3), CPU)
    start = {k: v.clone() for k, v in c.model.state_dict().items()}
    a = {k: v.clone() for k, v in c.update(start, 0, 1, draw_as=5).state.items()}
    b = {k: v.clone() for k, v in c.update(start, 0, 1, draw_as=5).state.items()}
    other = c.update(start, 0, 1, draw_as=6).state
    assert all(torch.equal(a[k], b[k]) for k in a)  # its randomness comes from (seed, round, client id) alone
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_the_server_builds_the_model_from_the_config_and_needs_no_data(tmp_path):
    cfg = _cfg(tmp_path, modalities=("image",))
    fed = NodeFederation(cfg, CPU, [{"image": 64, "audio": 10}, {"audio": 48}], evaluate=False)
    assert fed.data == {} and fed.input_shapes == {"image": (1, 28, 28)} and fed.input_stats() == {}
    assert [fed.holds(0), fed.holds(1)] == [True, False] and fed.train_samples == {"image": 64}
    want = build_model(cfg.model, {"image": (1, 28, 28)}).state_dict()
    assert {k: v.shape for k, v in fed.model.state_dict().items()} == {k: v.shape for k, v in want.items()}


def test_a_server_told_to_evaluate_without_its_dataset_says_how_to_run_without_one(tmp_path):
    cfg = _cfg(tmp_path, dataset="cifar10+esc50", image_root=str(tmp_path / "none"), modalities=("image",))
    with pytest.raises(DataError, match=r"evaluation set: cifar10: .*dataset\. Give the server .*"
                                        r"\(run config eval-data=false"):
        NodeFederation(cfg, CPU, [{"image": 64}])


def test_the_state_travels_as_one_array_and_arrives_exact():
    state = {"w": torch.randn(3, 4), "n": torch.tensor(7), "h": torch.randn(5).bfloat16()}
    record = pack(state)
    assert list(record.keys()) == ["state"]
    back = unpack(record, CPU)
    assert all(torch.equal(state[k], back[k]) and state[k].dtype == back[k].dtype for k in state)


class FakeGrid:
    """Stands for the SuperLink: replies[i] is what the message to node i gets back (None: nothing, ever)."""

    def __init__(self, node_ids, replies):
        self.node_ids, self.replies, self.sent = node_ids, replies, []

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, msgs):
        self.sent = list(msgs)
        return [f"id{i}" for i in range(len(self.sent))]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            k = int(i[2:])
            rep = self.replies.get(self.sent[k].metadata.dst_node_id)
            if rep is not None:
                out.append(types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=i), **rep))
        return out


def _error(reason):
    return {"has_error": lambda: True, "error": types.SimpleNamespace(code=5, reason=reason)}


def _ok(content):
    return {"has_error": lambda: False, "content": content}


@pytest.fixture
def in_a_run(monkeypatch):
    """Messages are made inside a Flower run: its id is what a ServerApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)


def _engine(grid, timeout=0.0):
    clients = types.SimpleNamespace(cfg=PretrainConfig(), device="cpu")
    return FlowerEngine(grid, clients, nodes=[11, 22, 33], mode="node-local", timeout=timeout)


def test_a_node_lost_mid_round_is_named_with_its_client_and_the_run_stops_at_its_last_round(in_a_run):
    grid = FakeGrid([11, 22, 33], {11: _ok({}), 22: _error("Error: Node Unavailable - no heartbeat"), 33: _ok({})})
    with pytest.raises(FlowerError, match=r"round 3: SuperNode 22 \(client 1\) disconnected mid-round; "
                                          r"\S+/last.pt holds round 2: start the node again and resume"):
        _engine(grid).round(3, [0, 1, 2], {"w": torch.zeros(2)}, {}, None)
    assert [m.metadata.dst_node_id for m in grid.sent] == [11, 22, 33]
    silent = FakeGrid([11, 22, 33], {11: _ok({})})
    with pytest.raises(FlowerError, match=r"SuperNodes 22, 33 \(clients 1, 2\) sent no reply"):
        _engine(silent, timeout=0.3).round(3, [0, 1, 2], {"w": torch.zeros(2)}, {}, None)
    failed = FakeGrid([11, 22, 33], {11: _ok({}), 22: _ok({}), 33: _error("<class 'ValueError'>:<'boom'>")})
    with pytest.raises(FlowerError, match=r"the ClientApp of client 2 on SuperNode 33 failed \(5\): .*boom"):
        _engine(failed).round(1, [0, 1, 2], {"w": torch.zeros(2)}, {}, None)


def test_enlist_refuses_nodes_that_cannot_train_and_sizes_the_federation_to_the_rest(capsys, monkeypatch, in_root,
                                                                                    in_a_run):
    monkeypatch.setattr(flower_app.time, "sleep", lambda s: None)
    grid = FakeGrid([30, 10, 20, 40], {10: _ok({"config": {"root": "/data/a", "n_image": 64}}),
                                       20: _ok({"config": {"refused": "data-root /data/b: nothing to train on"}}),
                                       30: _error("<class 'OSError'>:<'disk'>"),
                                       40: _error("Error: Node Unavailable — no heartbeat")})
    nodes_, counts, extra = enlist(grid, ["configs/smoke.yaml", "--fed.clients_per_round=2"], 4, 0.0)
    out = capsys.readouterr().out
    assert "SuperNode 40: refused: not reachable" in out  # e.g. a node of an earlier run, not yet timed out
    assert "SuperNode 20: refused: data-root /data/b: nothing to train on" in out
    assert "SuperNode 30: refused: its ClientApp failed: <class 'OSError'>:<'disk'>" in out
    assert "SuperNode 10: /data/a: 64 image" in out
    assert nodes_ == [10] and counts == [{"image": 64}] and extra == ["--fed.clients=1", "--fed.clients_per_round=1"]
    none = FakeGrid([10], {10: _ok({"config": {"refused": "no data"}})})
    with pytest.raises(FlowerError, match="none of the 1 SuperNodes can train"):
        enlist(none, ["configs/smoke.yaml"], 1, 0.0)


def test_every_stop_signal_unwinds_deploy_through_its_clean_up():
    import os
    import signal
    from fedengines import localhost
    assert set(localhost.STOP_SIGNALS) == {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    old = {s: signal.signal(s, localhost.stop_handler) for s in localhost.STOP_SIGNALS}
    try:
        for s in localhost.STOP_SIGNALS:
            with pytest.raises(localhost.Stopped) as e:
                os.kill(os.getpid(), s)  # the handler runs (and raises) before the next line
                time.sleep(5)
            assert e.value.signum == s
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert localhost.process_tree([os.getpid()])[0] == os.getpid()
