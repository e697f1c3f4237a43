"""`ray job submit --working-dir . -- pmc finetune <config>` against a Ray head started here.

The head is a second, short-lived Ray instance of its own (loopback only, free ports, its own temp
dir), started with `ray start --head --block` in a new process group and ended by signalling that
group: `ray stop` would also stop every other Ray instance on the machine. The job is a tiny ZeRO-3
fine-tune (no vLLM engine): it exercises cluster discovery from RAY_ADDRESS, the repo's runtime env,
logs streamed to the job and outputs written to a directory shared with the submitter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
WORKER_PORTS = 50  # size of the workers' port range


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `pmc` and `python` are this venv's
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A loopback-only Ray head (dashboard + job server) for this module; always ended."""
    low = min(_free_ports(1)[0], 65535 - WORKER_PORTS)
    # the components' ports must not fall inside the workers' range, or `ray start` refuses to start
    while True:
        ports = _free_ports(9)
        if not any(low <= port <= low + WORKER_PORTS for port in ports):
            break
    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, metrics, runtime_env = ports
    temp_dir = tempfile.mkdtemp(prefix="pmcray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS}",
               "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}", "--object-store-memory=500000000"]
    head = subprocess.Popen(command, env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}: {head.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head's job server did not answer within {HEAD_START_TIMEOUT_S} s")
            time.sleep(1)
        yield {"address": address}
    finally:
        _end_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (ray start stops what it started), SIGKILL if it lingers
    (here it always took the whole grace period: 30 s then; nothing of the head is kept)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def submitted_job(ray_head, tmp_path_factory, tiny_model_dir, demo_data_dir):
    shared = tmp_path_factory.mktemp("shared-storage")  # stands in for a volume every node mounts
    config = shared / "finetune-tiny.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "model": {"path": str(tiny_model_dir)}, "data": {"tofu_dir": str(demo_data_dir), "train": "full"},
        "epochs": 1, "seed": 0, "output_dir": str(shared / "finetuned"),
        "trainer": {"world_size": 1, "batch_size": 8, "learning_rate": 1e-3, "max_length": 128, "torch_threads": 1},
    }))
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", ".",
               "--runtime-env", "configs/ray/runtime_env.yaml", "--", "pmc", "finetune", str(config)]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    return {"done": done, "log": done.stdout + done.stderr, "shared": shared, "head": ray_head}


def test_job_succeeds_and_writes_to_shared_storage(submitted_job):
    done, log = submitted_job["done"], submitted_job["log"]
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log
    checkpoint = submitted_job["shared"] / "finetuned"
    assert {"config.json", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}


def test_job_driver_joins_the_cluster_and_streams_progress(submitted_job):
    log = submitted_job["log"]
    # the driver found the head through RAY_ADDRESS (set by the job server), not a new local instance
    assert "Connected to Ray cluster" in log and "Started a local Ray instance" not in log, log[-4000:]
    assert "finetune epoch 1/1: loss" in log  # progress reached the job's log
    assert "fine-tuned checkpoint written to" in log
