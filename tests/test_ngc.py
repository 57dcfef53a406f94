"""The NVIDIA training-container backend.

No Docker engine, GPU or NVIDIA image exists here, so the container itself never runs in
these tests: they check the config and the docker SDK arguments we generate, the real
docker SDK's failure against an engine that is not there, and the collection of a model
repository laid out by hand the way the container writes it.
"""

import json

import numpy as np
import pytest

from fraudlib import ngc
from fraudlib.graph_store import Graph, write_part
from fraudlib.settings import TRITON_MODEL_NAME
from fraudlib.training import HyperparameterError

SECRET = "nvapi-test-key-that-must-not-leak"


@pytest.fixture
def graph_dir(tmp_path):
    """A tiny real graph directory (train part) written by graph_store."""
    graph = Graph(
        x_user=np.zeros((2, 1), np.float32), x_merchant=np.zeros((2, 1), np.float32),
        edge_index=np.array([[0, 1], [1, 0]], np.int64), edge_attr=np.zeros((2, 1), np.float32),
        label=np.array([0, 1], np.int64), split=np.array(["train", "validation"], dtype=object),
        user_features=["u0"], merchant_features=["m0"], edge_features=["e0"],
        feature_mask_user=np.array([0]), feature_mask_merchant=np.array([0]),
        feature_mask_edge=np.array([0]),
    )
    root = tmp_path / "graph"
    write_part(root, "train", graph)
    return root


def _model(config):
    return config["models"][0]


def test_config_names_container_mount_points_and_the_gnn_xgboost_model(graph_dir, tmp_path):
    config = ngc.build_training_config(graph_dir, tmp_path / "out")
    assert config["paths"] == {"data_dir": "/data", "output_dir": "/trained_models"}
    assert len(config["models"]) == 1
    assert _model(config)["kind"] == "GNN_XGBoost"
    assert _model(config)["gpu"] == "single"
    assert set(_model(config)["hyperparameters"]) == {"gnn", "xgb"}


def test_config_defaults_are_the_training_containers(graph_dir, tmp_path):
    hp = _model(ngc.build_training_config(graph_dir, tmp_path / "out"))["hyperparameters"]
    assert hp["gnn"] == {"hidden_channels": 32, "n_hops": 2, "layer": "SAGEConv",
                         "dropout_prob": 0.1, "batch_size": 4096, "fan_out": 10, "num_epochs": 8}
    assert hp["xgb"] == {"max_depth": 6, "learning_rate": 0.2, "num_parallel_tree": 3,
                         "num_boost_round": 512, "gamma": 0.0}


def test_overrides_replace_only_the_named_hyperparameters(graph_dir, tmp_path):
    config = ngc.build_training_config(graph_dir, tmp_path / "out",
                                       gnn_params={"hidden_channels": 64, "num_epochs": 2},
                                       xgb_params={"gamma": 1, "max_depth": 4})
    hp = _model(config)["hyperparameters"]
    assert hp["gnn"]["hidden_channels"] == 64 and hp["gnn"]["num_epochs"] == 2
    assert hp["gnn"]["n_hops"] == 2 and hp["gnn"]["layer"] == "SAGEConv"
    assert hp["xgb"]["max_depth"] == 4
    assert hp["xgb"]["gamma"] == 1.0 and isinstance(hp["xgb"]["gamma"], float)
    assert hp["xgb"]["num_boost_round"] == 512


def test_config_is_plain_json(graph_dir, tmp_path):
    config = ngc.build_training_config(graph_dir, tmp_path / "out", {"dropout_prob": 0.3})
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize("section", ["gnn", "xgb"])
def test_unknown_hyperparameter_is_named_in_the_error(graph_dir, tmp_path, section):
    params = {"hidden_chanels": 16}
    kwargs = {"gnn_params": params} if section == "gnn" else {"xgb_params": params}
    with pytest.raises(HyperparameterError, match=rf"{section}: unknown .*'hidden_chanels'"):
        ngc.build_training_config(graph_dir, tmp_path / "out", **kwargs)


def test_wrongly_typed_hyperparameter_is_named_in_the_error(graph_dir, tmp_path):
    with pytest.raises(HyperparameterError, match=r"gnn\['num_epochs'\] = 2.5 has the wrong type"):
        ngc.build_training_config(graph_dir, tmp_path / "out", gnn_params={"num_epochs": 2.5})
    with pytest.raises(HyperparameterError, match=r"xgb\['max_depth'\] = True has the wrong type"):
        ngc.build_training_config(graph_dir, tmp_path / "out", xgb_params={"max_depth": True})


def test_out_of_range_hyperparameter_is_named_in_the_error(graph_dir, tmp_path):
    with pytest.raises(HyperparameterError, match=r"gnn\['dropout_prob'\] = 1.5 is out of range"):
        ngc.build_training_config(graph_dir, tmp_path / "out", gnn_params={"dropout_prob": 1.5})


def test_config_requires_a_preprocessed_graph_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess"):
        ngc.build_training_config(tmp_path / "empty", tmp_path / "out")


def test_output_inside_the_graph_directory_is_refused(graph_dir):
    with pytest.raises(ValueError, match="immutable input"):
        ngc.build_training_config(graph_dir, graph_dir / "models")


def _spec(graph_dir, tmp_path, **kwargs):
    config_path = tmp_path / "training_config.json"
    config_path.write_text("{}")
    return ngc.container_spec(config_path, graph_dir, tmp_path / "trained", **kwargs)


def test_spec_runs_the_training_image_on_one_requested_gpu(graph_dir, tmp_path):
    spec = _spec(graph_dir, tmp_path, gpu_device="1")
    assert spec["image"] == "nvcr.io/nvidia/cugraph/financial-fraud-training:2.0.0"
    assert spec["device_requests"] == [
        {"driver": "nvidia", "device_ids": ["1"], "capabilities": [["gpu"]]}
    ]
    assert spec["command"][-2:] == ["--config", "/app/config.json"]


def test_spec_mounts_graph_data_output_and_config(graph_dir, tmp_path):
    volumes = _spec(graph_dir, tmp_path)["volumes"]
    assert volumes == {
        str((graph_dir / "gnn").resolve()): {"bind": "/data", "mode": "ro"},
        str((tmp_path / "trained").resolve()): {"bind": "/trained_models", "mode": "rw"},
        str((tmp_path / "training_config.json").resolve()): {"bind": "/app/config.json",
                                                             "mode": "ro"},
    }


def test_spec_sets_shared_memory_and_socket_only_nccl(graph_dir, tmp_path):
    spec = _spec(graph_dir, tmp_path)
    assert spec["shm_size"] == "8g"
    env = spec["environment"]
    assert env["NCCL_IB_DISABLE"] == "1"
    assert env["NCCL_NET"] == "Socket"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_P2P_DISABLE"] == "1" and env["NCCL_SHM_DISABLE"] == "1"


def test_extra_env_overrides_nccl_settings(graph_dir, tmp_path):
    env = _spec(graph_dir, tmp_path, extra_env={"NCCL_SOCKET_IFNAME": "lo"})["environment"]
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["NCCL_IB_DISABLE"] == "1"


def test_ngc_key_never_enters_the_spec(graph_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    spec = _spec(graph_dir, tmp_path)
    assert SECRET not in json.dumps(spec)
    assert "NGC_API_KEY" not in spec["environment"]
    with pytest.raises(ValueError, match="NGC_API_KEY must not be passed"):
        _spec(graph_dir, tmp_path, extra_env={"NGC_API_KEY": SECRET})


def test_docker_sdk_translates_the_spec_into_a_gpu_host_config(graph_dir, tmp_path):
    # The real SDK's own translation of containers.run(**spec) kwargs (no engine needed).
    from docker.models.containers import _create_container_args

    spec = _spec(graph_dir, tmp_path)
    args = _create_container_args({**spec, "version": "1.44"})
    host = args["host_config"]
    assert host["DeviceRequests"][0]["Driver"] == "nvidia"
    assert host["DeviceRequests"][0]["DeviceIDs"] == ["0"]
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host["ShmSize"] == 8 * 1024**3
    assert host["CapAdd"] == ["SYS_NICE"]
    assert sorted(bind.split(":", 1)[1] for bind in host["Binds"]) == [
        "/app/config.json:ro", "/data:ro", "/trained_models:rw"]
    assert args["entrypoint"] == ["torchrun"]
    assert args["environment"]["NCCL_NET"] == "Socket"


def test_training_without_a_docker_engine_fails_clearly_and_writes_nothing(
        graph_dir, tmp_path, monkeypatch):
    # Real docker SDK against a socket path where no engine listens.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    out = tmp_path / "models" / "run1"
    out.parent.mkdir()
    with pytest.raises(ngc.NgcUnavailableError, match="needs a Docker engine") as info:
        ngc.train_with_container(graph_dir, out, log=lambda line: None)
    message = str(info.value)
    assert "no-engine.sock" in message and "local backend" in message
    assert SECRET not in message
    assert list(out.parent.iterdir()) == []


def test_training_checks_hyperparameters_before_looking_for_docker(graph_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    with pytest.raises(HyperparameterError, match="'fanout'"):
        ngc.train_with_container(graph_dir, tmp_path / "out", gnn_params={"fanout": 5})


def test_training_refuses_an_existing_output_folder(graph_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        ngc.train_with_container(graph_dir, tmp_path / "out")


def _container_output(root, meta):
    """A model repository laid out as the container writes it (made by hand here)."""
    version = root / "python_backend_model_repository" / TRITON_MODEL_NAME / "1"
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text('name: "prediction_and_shapley"\n')
    (version / "model.py").write_text("# the container's python backend\n")
    (version / "state_dict_gnn_model.pth").write_bytes(b"weights")
    (version / "embedding_based_xgboost.json").write_text("{}")
    (version / "meta.json").write_text(json.dumps(meta))
    return root


def test_collecting_hand_made_container_output_gives_our_package_layout(tmp_path):
    raw = _container_output(tmp_path / "trained_models", {"in_channels": 13})
    model_dir = ngc.collect_container_output(raw, tmp_path / "package",
                                             {"manifest_hash": "abc", "trainer": {"backend": "ngc"}})
    assert model_dir == tmp_path / "package" / TRITON_MODEL_NAME
    assert (model_dir / "config.pbtxt").is_file()
    for name in ("model.py", "state_dict_gnn_model.pth", "embedding_based_xgboost.json"):
        assert (model_dir / "1" / name).is_file()
    meta = json.loads((model_dir / "1" / "meta.json").read_text())
    assert meta == {"in_channels": 13, "manifest_hash": "abc", "trainer": {"backend": "ngc"}}


def test_collecting_keeps_the_containers_meta_values_over_ours(tmp_path):
    raw = _container_output(tmp_path / "trained_models", {"hyperparameters": {"from": "container"}})
    model_dir = ngc.collect_container_output(raw, tmp_path / "package",
                                             {"hyperparameters": {"from": "us"}})
    meta = json.loads((model_dir / "1" / "meta.json").read_text())
    assert meta["hyperparameters"] == {"from": "container"}


def test_collecting_output_without_weights_names_the_missing_file(tmp_path):
    raw = _container_output(tmp_path / "trained_models", {})
    (raw / "python_backend_model_repository" / TRITON_MODEL_NAME / "1"
     / "state_dict_gnn_model.pth").unlink()
    with pytest.raises(ngc.NgcTrainingError, match="state_dict_gnn_model.pth"):
        ngc.collect_container_output(raw, tmp_path / "package", {})
