"""A real two-node Ray cluster on this machine: `tether submit` through the Jobs API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tether.submit import entrypoint, follow, read_token_file, submit

from .helpers import free_port, stop_server, wait_until_healthy

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + one worker node, 1 CPU each, so a 2-worker job must span both nodes."""
    from ray.cluster_utils import Cluster

    # the nodes' job drivers run `python -m tether.cli`: put this interpreter first on PATH
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{old_path}"
    dashboard_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "object_store_memory": 200 * 1024**2,
        },
    )
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    try:
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()
        os.environ["PATH"] = old_path


def test_cluster_config_has_the_keys_ray_up_needs():
    """cluster.yaml parses and carries the launcher's required keys and private-port advice."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    for name, node in config["available_node_types"].items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(node), name
    assert config["provider"]["type"] in {"aws", "gcp", "azure", "local"}
    setup = " ".join(config["setup_commands"])
    assert "tether" in setup and "pip install" in setup
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    # jobs inherit the raylet's environment: each `ray start` carries the tracking server's
    # address, the head's private one (a bare `ray get-head-ip` needs the config file: it
    # failed on the nodes and left 127.0.0.1, where no server listens)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert start.startswith("export MLFLOW_TRACKING_URI=http://"), start
    assert "get-head-ip" not in yaml.safe_dump(config)
    assert "$RAY_HEAD_IP:5000" in " ".join(config["worker_start_ray_commands"])


def test_entrypoint_quotes_overrides():
    """The cluster command quotes every argument (overrides may contain spaces)."""
    cmd = entrypoint("jobs/demo.yaml", ["model.freeze=[a, b]"], tune=False)
    assert cmd == "python -m tether.cli train jobs/demo.yaml 'model.freeze=[a, b]'"


def test_invalid_spec_is_rejected_before_submission(tmp_path):
    """A bad override fails locally: no cluster address is even contacted."""
    from tether.config import SpecError

    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    with pytest.raises(SpecError, match="objective.lambda"):
        submit(job, ["objective.lambda=-1"], address="http://127.0.0.1:9", working_dir=tmp_path)


def test_home_directory_is_refused_as_the_upload(tmp_path, monkeypatch):
    """Run from $HOME (or above it), the upload would carry the whole account: refused before
    any cluster is contacted."""
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    (home / "jobs" / "x.yaml").write_text("name: x\n")
    monkeypatch.setenv("HOME", str(home))
    for folder in (home, tmp_path):
        with pytest.raises(ValueError, match="home directory"):
            submit(home / "jobs" / "x.yaml", [], address="http://127.0.0.1:9", working_dir=folder)


def test_tokens_come_from_a_file_not_argv(tmp_path, capsys):
    """--token-file is read (stripped); a missing or empty one is a clear exit-2 error, and
    there is no --token flag that `ps` would show."""
    from tether.cli import main

    (tmp_path / "token").write_text("s3cret\n")
    assert read_token_file(tmp_path / "token") == "s3cret"
    assert read_token_file(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(tmp_path / "empty")
    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    argv = [
        "submit",
        str(job),
        "--working-dir",
        str(tmp_path),
        "--token-file",
        str(tmp_path / "no"),
    ]
    assert main(argv) == 2
    assert "--token-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["submit", str(job), "--token", "s3cret"])


def test_submitted_train_job_spans_both_nodes_and_writes_shared_storage(
    two_node_cluster, tiny_model_dir, easy_csv, tmp_path, capsys
):
    """`tether submit --follow` runs a 2-worker train job across both nodes; outputs land in
    the shared storage path."""
    _, address = two_node_cluster
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    (work / "jobs" / "tiny.yaml").write_text("# Launch: tether submit jobs/tiny.yaml\nname: tiny\n")
    # credentials a project folder tends to collect, none of them git-ignored here
    secrets = [".env", "keys/id_rsa", ".aws/credentials", "certs/server.pem", ".netrc"]
    for name in secrets:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("do-not-upload\n")
    (work / "notes.txt").write_text("ordinary project file\n")
    storage = tmp_path / "shared-storage"  # stands in for NFS/S3: every node sees this path
    overrides = [
        f"model.name={tiny_model_dir}",
        "model.label_names=[negative, positive]",
        f"data.train={easy_csv['train']}",
        f"data.validation={easy_csv['validation']}",
        "data.max_length=32",
        "train.max_steps=6",
        "train.eval_interval=3",
        "train.batch_size=16",
        "scaling.num_workers=2",
        f"storage.path={storage}",
        "storage.run_name=on-cluster",
        "tracking.enabled=false",
    ]
    client, sid = submit(work / "jobs" / "tiny.yaml", overrides, address=address, working_dir=work)
    printed = capsys.readouterr().out
    assert "uploading" in printed and "2 files" in printed, printed  # tiny.yaml, notes.txt
    assert all(name in printed for name in secrets), printed
    status = follow(client, sid)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-3000:]
    # what the cluster unpacked: the project files, none of the credentials
    cluster, _ = two_node_cluster
    unpacked = Path(cluster.head_node.get_session_dir_path()) / "runtime_resources"
    packages = [p.parents[1] for p in unpacked.rglob("jobs/tiny.yaml")]
    assert packages, f"no unpacked working dir under {unpacked}"
    for package in packages:
        assert (package / "notes.txt").is_file()
        shipped = {str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()}
        assert not shipped & set(secrets), shipped
    # our progress lines reach the job's log; Train V2's per-report INFO dump does not
    assert "[tether] step" in logs and "Reporting training result" not in logs, logs[-3000:]
    run_dir = storage / "on-cluster"
    # every rank records the node it ran on: rank 0 and rank 1 sat on different nodes
    final = run_dir / "checkpoint_000006"
    workers = [json.loads((final / f"worker_rank{r}.json").read_text()) for r in (0, 1)]
    node_ids = {w["node_id"] for w in workers}
    assert len(node_ids) == 2 and None not in node_ids
    assert node_ids <= {n.node_id for n in cluster.list_all_nodes()}
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "summary.json").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_000003",
        "checkpoint_000006",
    ]


@pytest.fixture(scope="module")
def serving_cluster():
    """A head with no CPUs and a worker node with two: every replica lands on the worker node,
    a raylet of its own, working in its own directory, away from the registry's folder."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "object_store_memory": 200 * 1024**2,
        },
    )
    worker = cluster.add_node(num_cpus=2, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker.node_id
    finally:
        cluster.shutdown()


def test_a_replica_on_another_node_serves_the_pinned_registry_version(
    serving_cluster, tiny_model_dir, tmp_path
):
    """`tether serve --model-uri models:/svc@champion --tracking-uri …` against a 2-node
    cluster: the replica runs on the worker node and loads v1 from the registry it was told
    (the store lies in no process's working directory, so a replica without the URI would open
    an empty ./mlflow.db there), and stays pinned to v1 when the alias moves."""
    import subprocess

    import httpx
    from mlflow.tracking import MlflowClient

    from tether.registry import log_model, register_version
    from tether.tracking import active_tracking_uri

    from .test_serve import build_model_dir

    cluster, worker_node = serving_cluster
    store = tmp_path / "registry"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("serve", artifact_location=(store / "art").as_uri())
    for i in (1, 2):
        model_dir = build_model_dir(tiny_model_dir, tmp_path / f"m{i}", f"svc-{i}", seed=i)
        run_id = client.create_run(exp).info.run_id
        with active_tracking_uri(uri):  # MLflow resolves models:/m-… through the global URI
            register_version(client, log_model(uri, run_id, model_dir), "svc", run_id, {})
    client.set_registered_model_alias("svc", "champion", "1")

    elsewhere = tmp_path / "cwd"  # a default ./mlflow.db here would be an empty store
    elsewhere.mkdir()
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "TETHER_API_KEY", "MLFLOW_TRACKING_URI")
    }
    argv = [sys.executable, "-m", "tether.cli", "serve", "--model-uri", "models:/svc@champion"]
    argv += ["--tracking-uri", uri, "--address", cluster.address, "--port", str(port)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=elsewhere, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log")
        client.set_registered_model_alias("svc", "champion", "2")  # the alias moves on
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert (info["name"], info["version"], info["alias"]) == ("svc", "1", "champion")
        answer = httpx.post(f"{url}/v1/predict", json={"texts": ["fine"]}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        from ray.util.state import list_actors

        replicas = [
            a
            for a in list_actors(address=cluster.gcs_address, filters=[("state", "=", "ALIVE")])
            if a.class_name.startswith("ServeReplica")
        ]
        assert replicas and {a.node_id for a in replicas} == {worker_node}
        assert not (elsewhere / "mlflow.db").exists()
    finally:
        stop_server(proc)
        log.close()
