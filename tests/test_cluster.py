"""A real two-node Ray cluster on this machine: `tether submit` through the Jobs API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tether.submit import entrypoint, follow, read_token_file, submit

from .helpers import free_port

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
