"""`tether submit`: run a train or tune job on a Ray cluster through the Jobs API.

    tether submit jobs/sst2.yaml [key=value ...] [--tune] [--address http://HEAD:8265] [--follow]

The spec is validated here first (schema, overrides, and the references that need no local
file: packaged and registered model names, synthetic datasets; data paths are checked on the
cluster, where they must exist), then the current directory is uploaded as the job's working
dir and ``tether train|tune`` runs there. Ray's token auth is honoured: the Jobs client sends
the token from RAY_AUTH_TOKEN / ~/.ray/auth_token, or the one read from --token-file (never
from argv, where `ps` shows it to every user of the machine).

The upload is a package every job on the cluster can read, so secrets never go: credential
files (.env, keys, .netrc, cloud and SSH folders, tokens) are excluded whatever .gitignore
says, the home directory is refused as a working dir, and the size and file count are printed
before anything is sent.

The Jobs API runs arbitrary code (CVE-2023-48022): keep port 8265 private (SSH tunnel, VPN),
never open it to a network without auth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# never shipped to the cluster: environments, local runs and stores, VCS data
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "benchmarks/results",
]
# credentials, wherever they sit in the tree (gitignore syntax, as Ray's excludes are: a
# pattern with a slash before its end is anchored to the root, so nested folders need **/)
SECRET_EXCLUDES = [
    ".env*",  # .env, .env.local, .envrc (direnv)
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".aws/",
    ".azure/",
    "**/.config/gcloud/",
    ".kube/",
    ".docker/",
    ".ssh/",
    ".ray/",
    ".cache/",
    ".huggingface/",
    "auth_token",
    "*token*.txt",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def register(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a train/tune job to a Ray cluster")
    p.add_argument("job", type=Path, help="job spec YAML, inside the directory that is uploaded")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--tune", action="store_true", help="run `tether tune` instead of train")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_JOBS_ADDRESS"),
        help=f"Jobs API address (default $RAY_JOBS_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--working-dir",
        type=Path,
        default=Path.cwd(),
        help="directory uploaded as the job's working dir (default: here)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the Ray auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)",
    )
    p.add_argument("--follow", action="store_true", help="stream logs; exit with the job's status")
    p.add_argument("--submission-id", default=None, help="choose the submission id")
    p.set_defaults(handler=cmd_submit)


def entrypoint(job_rel: str, overrides: list[str], tune: bool) -> str:
    """The command the cluster runs, in the uploaded working dir."""
    command = ["python", "-m", "tether.cli", "tune" if tune else "train", job_rel, *overrides]
    return " ".join(shlex.quote(c) for c in command)


def make_client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def read_token_file(path: Path | None) -> str | None:
    """The token in ``path`` (one line), or None to let Ray look it up."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: cannot read it ({e.strerror})") from None
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    return token


def check_working_dir(working_dir: Path) -> None:
    """Refuse folders whose upload would carry a user's whole account to the cluster."""
    home = Path.home().resolve()
    if working_dir == home or working_dir in home.parents:
        raise ValueError(
            f"refusing to upload {working_dir}: it is (or holds) your home directory; "
            "run from the project folder or pass --working-dir"
        )


def upload_contents(working_dir: Path) -> tuple[int, int, list[str]]:
    """(files, bytes) Ray will upload, with the same exclude rules (its own walk, .gitignore
    included unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), and the secret files left out."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    counted = {"files": 0, "bytes": 0}
    withheld: list[str] = []
    secret = _get_excludes(working_dir, SECRET_EXCLUDES)

    def count(path: Path) -> None:
        if not path.is_file():
            return
        if secret(path):
            withheld.append(str(path.relative_to(working_dir)))
        else:
            counted["files"] += 1
            counted["bytes"] += path.stat().st_size

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(
        working_dir, [_get_excludes(working_dir, UPLOAD_EXCLUDES)], count, include_gitignore
    )
    return counted["files"], counted["bytes"], sorted(withheld)


def submit(
    job: Path,
    overrides: list[str],
    *,
    tune: bool = False,
    address: str = DEFAULT_ADDRESS,
    working_dir: Path | None = None,
    token: str | None = None,
    submission_id: str | None = None,
) -> tuple[object, str]:
    """Validate, then submit; returns (client, submission id)."""
    from tether.config import load_job

    working_dir = (working_dir or Path.cwd()).resolve()
    job_path = job.resolve()
    try:
        job_rel = str(job_path.relative_to(working_dir))
    except ValueError:
        raise ValueError(
            f"job spec {job} is not inside the uploaded directory {working_dir}"
        ) from None
    # spec errors stop here, before any upload; files are checked where the job runs
    load_job(job_path, overrides, check_files=False)
    check_working_dir(working_dir)
    files, size, withheld = upload_contents(working_dir)
    print(f"tether: uploading {working_dir}: {files} files, {size / 2**20:.1f} MiB", flush=True)
    if withheld:
        shown = ", ".join(withheld[:8]) + (" …" if len(withheld) > 8 else "")
        print(f"tether: left out as secrets: {shown}", flush=True)
    client = make_client(address, token)
    request = {
        "entrypoint": entrypoint(job_rel, overrides, tune),
        "submission_id": submission_id,
        "runtime_env": {
            "working_dir": str(working_dir),
            "excludes": UPLOAD_EXCLUDES + SECRET_EXCLUDES,
            "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
        },
        "metadata": {"tether.job": job_rel, "tether.command": "tune" if tune else "train"},
    }
    return client, submit_with_retry(client, request)


def submit_with_retry(client, request: dict, timeout_s: float = 240.0) -> str:
    """Submit; a just-started head answers "No available agent" until its job agent is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, sid: str, poll_s: float = 2.0) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # log streaming is best-effort; the status below is what counts
        print(f"tether: log stream ended ({type(e).__name__}); polling status", file=sys.stderr)
    while (status := str(client.get_job_status(sid)).split(".")[-1]) not in TERMINAL:
        time.sleep(poll_s)
    return status


def cmd_submit(args: argparse.Namespace) -> int:
    from tether.config import SpecError

    address = args.address or DEFAULT_ADDRESS
    try:
        token = read_token_file(args.token_file)
        client, sid = submit(
            args.job,
            args.overrides,
            tune=args.tune,
            address=address,
            working_dir=args.working_dir,
            token=token,
            submission_id=args.submission_id,
        )
    except (SpecError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    except Exception as e:  # unreachable cluster, auth refused
        print(f"tether: submission to {address} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"submitted {sid} to {address}")
    print(f"  logs:   ray job logs --address {address} --follow {sid}")
    print(f"  status: ray job status --address {address} {sid}")
    if not args.follow:
        return 0
    status = follow(client, sid)
    print(f"tether: job {sid} {status}")
    return 0 if status == "SUCCEEDED" else 1
