"""Optional training backend: NVIDIA's financial-fraud training container (``backend="ngc"``).

For GPU hosts with Docker and the NVIDIA Container Toolkit. The container reads the
blueprint's graph layout (``<graph_dir>/gnn``, mounted at ``/data``) and a training config
(format 2.0.0, mounted at ``/app/config.json``), and writes a Triton Python-backend model
repository into ``/trained_models/python_backend_model_repository``. That repository is
collected into our model package layout (docs/architecture.md, "Model package")::

    <out>/prediction_and_shapley/config.pbtxt          the container's
    <out>/prediction_and_shapley/1/model.py            the container's (architecture inside)
    <out>/prediction_and_shapley/1/state_dict_gnn_model.pth
    <out>/prediction_and_shapley/1/embedding_based_xgboost.json
    <out>/prediction_and_shapley/1/meta.json           the container's, plus our provenance keys
    <out>/ngc/training_config.json                     the config the container ran with
    <out>/ngc/container.log                            the container's full log
    <out>/ngc/trained_models/                          the container's raw output, as written

The NGC API key is read from ``$NGC_API_KEY`` only to pull the image; it is never a
parameter, never passed into the container and never written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fraudlib.settings import TRITON_MODEL_NAME
from fraudlib.graph_store import manifest_hash
from fraudlib.training import GNNSettings, XGBSettings, container_settings, parse_settings

TRAINING_IMAGE = "nvcr.io/nvidia/cugraph/financial-fraud-training:2.0.0"
MODEL_KIND = "GNN_XGBoost"

# Mount points inside the container (the blueprint's docker run command).
CONTAINER_DATA_DIR = "/data"
CONTAINER_OUTPUT_DIR = "/trained_models"
CONTAINER_CONFIG_PATH = "/app/config.json"
CONTAINER_MODEL_REPOSITORY = "python_backend_model_repository"

# torch DataLoader workers share batches through /dev/shm; Docker's default 64 MB is too small.
SHM_SIZE = "8g"

# Single-GPU training still initialises NCCL; on hosts without InfiniBand (most cloud VMs)
# its IB/P2P/SHM transports fail or hang, so force plain sockets on the container's eth0.
NCCL_ENV = {
    "NCCL_IB_DISABLE": "1",
    "NCCL_NET": "Socket",
    "NCCL_SOCKET_IFNAME": "eth0",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
}

NGC_KEY_ENV = "NGC_API_KEY"


class NgcUnavailableError(RuntimeError):
    """The container cannot be run here: no docker SDK, no engine, no image or no GPU runtime."""


class NgcTrainingError(RuntimeError):
    """The container ran but did not produce a model repository."""


@dataclass(frozen=True)
class NgcTrainingResult:
    model_dir: Path  # <out>/prediction_and_shapley
    config_path: Path  # <out>/ngc/training_config.json
    log_path: Path  # <out>/ngc/container.log
    image: str


def build_training_config(graph_dir: Path | str, output_dir: Path | str,
                          gnn_params: dict | None = None, xgb_params: dict | None = None) -> dict:
    """The container's training config (format 2.0.0) for one GNN + XGBoost model.

    ``graph_dir`` and ``output_dir`` are host paths; the config names the container mount
    points that :func:`container_spec` binds them to. Hyperparameters are validated by the
    same rules as the local trainer (names and defaults are the container's); an unknown
    name, a wrong type or a value out of range raises HyperparameterError naming the key.
    """
    # The container trains the blueprint's GNN: fraudlib's own settings (edge means) stay out.
    gnn = container_settings(parse_settings(GNNSettings, gnn_params, "gnn"))
    xgb = container_settings(parse_settings(XGBSettings, xgb_params, "xgb"))
    graph_dir, output_dir = Path(graph_dir).resolve(), Path(output_dir).resolve()
    gnn_data = graph_dir / "gnn"
    if not (gnn_data / "nodes").is_dir() or not (gnn_data / "edges").is_dir():
        raise FileNotFoundError(
            f"{gnn_data} has no nodes/ and edges/: is {graph_dir} a preprocessed graph directory? "
            "Run the preprocess stage first."
        )
    if output_dir == graph_dir or graph_dir in output_dir.parents:
        raise ValueError(
            f"output_dir {output_dir} lies inside the graph directory {graph_dir}; a graph "
            "directory is an immutable input (its manifest hash names it): choose another folder"
        )
    return {
        "paths": {"data_dir": CONTAINER_DATA_DIR, "output_dir": CONTAINER_OUTPUT_DIR},
        "models": [
            {
                "kind": MODEL_KIND,
                "gpu": "single",
                "hyperparameters": {"gnn": gnn, "xgb": xgb},
            }
        ],
    }


def container_spec(config_path: Path | str, graph_dir: Path | str, output_dir: Path | str,
                   image: str = TRAINING_IMAGE, gpu_device: str = "0",
                   extra_env: dict[str, str] | None = None) -> dict:
    """Keyword arguments for the docker SDK's ``client.containers.run``.

    The equivalent of ``docker run --gpus device=<gpu_device> --cap-add SYS_NICE
    --shm-size 8g -e NCCL_... -v <graph_dir>/gnn:/data:ro -v <output_dir>:/trained_models
    -v <config>:/app/config.json:ro <image> torchrun --standalone ... /app/main.py``.
    ``extra_env`` adds or overrides container variables (e.g. ``NCCL_SOCKET_IFNAME`` on a
    host-network setup); it may not carry the NGC key, which the container never needs.
    """
    extra_env = dict(extra_env or {})
    if NGC_KEY_ENV in extra_env:
        raise ValueError(f"{NGC_KEY_ENV} must not be passed into the training container")
    config_path = Path(config_path).resolve()
    gnn_data = (Path(graph_dir) / "gnn").resolve()
    output_dir = Path(output_dir).resolve()
    return {
        "image": image,
        "entrypoint": ["torchrun"],
        "working_dir": "/app",
        "command": ["--standalone", "--nnodes=1", "--nproc-per-node=1", "/app/main.py",
                    "--config", CONTAINER_CONFIG_PATH],
        "device_requests": [
            {"driver": "nvidia", "device_ids": [str(gpu_device)], "capabilities": [["gpu"]]}
        ],
        "volumes": {
            str(gnn_data): {"bind": CONTAINER_DATA_DIR, "mode": "ro"},
            str(output_dir): {"bind": CONTAINER_OUTPUT_DIR, "mode": "rw"},
            str(config_path): {"bind": CONTAINER_CONFIG_PATH, "mode": "ro"},
        },
        "shm_size": SHM_SIZE,
        "cap_add": ["SYS_NICE"],
        "environment": {**NCCL_ENV, **extra_env},
    }


def _docker_client():
    """A connected docker client, or NgcUnavailableError saying what is missing."""
    try:
        import docker  # optional: only the ngc backend needs it
    except ImportError as exc:
        raise NgcUnavailableError(
            "backend='ngc' needs the docker Python package: pip install docker==7.2.0 "
            "(or use the default local backend)"
        ) from exc
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise NgcUnavailableError(
            f"backend='ngc' needs a Docker engine, and none answers at {where} ({exc}). "
            "Start Docker on a GPU host with the NVIDIA Container Toolkit, or use the "
            "default local backend."
        ) from exc
    return client


def _ensure_image(client, image: str, log: Callable[[str], None]) -> None:
    """Pull the image when it is absent and ``$NGC_API_KEY`` is set; else explain how."""
    import docker

    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    key = os.environ.get(NGC_KEY_ENV)
    if not key:
        raise NgcUnavailableError(
            f"image {image} is not on this host. Set {NGC_KEY_ENV} (an NGC API key) and rerun, "
            f"or pull it yourself: echo \"${NGC_KEY_ENV}\" | docker login nvcr.io "
            f"--username '$oauthtoken' --password-stdin && docker pull {image}"
        )
    repository, _, tag = image.rpartition(":")
    log(f"pulling {image} from nvcr.io ...")
    try:
        # auth_config goes with this one request only: nothing is stored in a docker config file.
        client.images.pull(repository, tag=tag,
                           auth_config={"username": "$oauthtoken", "password": key})
    except docker.errors.APIError as exc:
        raise NgcUnavailableError(
            f"pulling {image} failed ({exc.explanation or exc}); check that {NGC_KEY_ENV} "
            "is a valid NGC API key with access to the image"
        ) from None  # the request carried the key: keep it out of the traceback chain


def _run_container(client, spec: dict, log_path: Path, log: Callable[[str], None]) -> int:
    """Run to completion, streaming the log to ``log_path`` and ``log``; the exit code."""
    import docker

    try:
        container = client.containers.run(detach=True, **spec)
    except docker.errors.APIError as exc:
        if "could not select device driver" in str(exc):
            raise NgcUnavailableError(
                "Docker has no GPU runtime (could not select device driver 'nvidia'): install "
                "the NVIDIA Container Toolkit and run 'nvidia-ctk runtime configure "
                "--runtime=docker', then restart Docker"
            ) from exc
        raise
    try:
        with log_path.open("w") as sink:
            pending = ""
            for chunk in container.logs(stream=True, follow=True):
                pending += chunk.decode(errors="replace")
                *lines, pending = pending.split("\n")
                for line in lines:
                    sink.write(line + "\n")
                    log(line)
            if pending:
                sink.write(pending + "\n")
                log(pending)
        return int(container.wait()["StatusCode"])
    finally:
        # Also on KeyboardInterrupt: a training container must not outlive its caller.
        container.remove(force=True)


def collect_container_output(container_output: Path | str, package_root: Path | str,
                             provenance: dict) -> Path:
    """Copy the model the container wrote under ``container_output`` (its ``/trained_models``)
    into ``package_root`` in our package layout, adding ``provenance`` to its meta.json.

    Also imports a container run started by hand (e.g. the blueprint's notebook). Returns
    the model directory ``<package_root>/prediction_and_shapley``.
    """
    source = Path(container_output) / CONTAINER_MODEL_REPOSITORY / TRITON_MODEL_NAME
    version = source / "1"
    for required in ("config.pbtxt", "1/model.py", "1/state_dict_gnn_model.pth",
                     "1/embedding_based_xgboost.json"):
        if not (source / required).is_file():
            raise NgcTrainingError(f"the training container wrote no {source / required}")
    model_dir = Path(package_root) / TRITON_MODEL_NAME
    # Copy, not move: files the container wrote belong to root and could not be edited.
    shutil.copytree(source, model_dir)
    meta_path = model_dir / "1" / "meta.json"
    meta = json.loads((version / "meta.json").read_text()) if (version / "meta.json").is_file() else {}
    # The container's model.py reads its own keys: add ours beside them, never over them.
    meta.update({k: v for k, v in provenance.items() if k not in meta})
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return model_dir


def train_with_container(graph_dir: Path | str, output_dir: Path | str,
                         gnn_params: dict | None = None, xgb_params: dict | None = None,
                         image: str = TRAINING_IMAGE,
                         gpu_device: str = "0", extra_env: dict[str, str] | None = None,
                         log: Callable[[str], None] = print) -> NgcTrainingResult:
    """Train with the NVIDIA container and write our model package to ``output_dir``.

    Everything is written to a staging folder beside ``output_dir`` and renamed into place
    when complete; after a failure the staging folder (with the container log) is kept and
    named in the error. Raises NgcUnavailableError when the docker SDK, the engine, the
    image or the GPU runtime is missing, NgcTrainingError when training fails.
    """
    graph_dir, output_dir = Path(graph_dir).resolve(), Path(output_dir).resolve()
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists: choose a new output folder")
    config = build_training_config(graph_dir, output_dir, gnn_params, xgb_params)
    client = _docker_client()
    _ensure_image(client, image, log)

    staging = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    ngc_dir = staging / "ngc"
    raw_output = ngc_dir / "trained_models"
    raw_output.mkdir(parents=True)
    config_path = ngc_dir / "training_config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log_path = ngc_dir / "container.log"

    spec = container_spec(config_path, graph_dir, raw_output, image, gpu_device, extra_env)
    exit_code = _run_container(client, spec, log_path, log)
    if exit_code != 0:
        raise NgcTrainingError(
            f"the training container exited with code {exit_code}; its log is {log_path}"
        )
    hyperparameters = config["models"][0]["hyperparameters"]
    provenance = {
        "trainer": {"backend": "ngc", "image": image, "kind": MODEL_KIND},
        "hyperparameters": hyperparameters,
        "manifest_hash": manifest_hash(graph_dir),
    }
    try:
        collect_container_output(raw_output, staging, provenance)
    except NgcTrainingError as exc:
        raise NgcTrainingError(f"{exc}; the container log is {log_path}") from None
    staging.rename(output_dir)
    return NgcTrainingResult(
        model_dir=output_dir / TRITON_MODEL_NAME,
        config_path=output_dir / "ngc" / "training_config.json",
        log_path=output_dir / "ngc" / "container.log",
        image=image,
    )
