"""docker/: what can be checked without a Docker engine (none runs here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_image_installs_with_the_repos_pinned_gpu_flavour():
    instructions = _instructions()
    assert instructions[0][0] == "FROM" and re.search(r"nvidia/cuda:\d+\.\d+\.\d+-", instructions[0][1])
    runs = [arg for op, arg in instructions if op == "RUN"]
    assert any("PMC_FLAVOUR=gpu bash scripts/install.sh" in run for run in runs)
    install = (REPO / "scripts" / "install.sh").read_text()
    assert '-r requirements/gpu.txt' in install  # ...which installs the pinned CUDA vLLM
    assert re.search(r"^vllm==\d", (REPO / "requirements" / "gpu.txt").read_text(), re.M)
    assert ("COPY", ". /opt/pmc") in instructions
    assert any(op == "ENV" and "/opt/pmc/.venv/bin" in arg for op, arg in instructions)


def test_compose_runs_a_head_gpu_workers_and_a_job():
    services = COMPOSE["services"]
    head, worker, submit = services["ray-head"], services["ray-worker"], services["submit"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--dashboard-port=8265" in head["command"]
    assert head["ports"] == ["127.0.0.1:8265:8265"]  # loopback only
    assert "--address=ray-head:6379" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for service in (head, worker, submit):
        assert service["shm_size"] and "pmc-data:/data" in service["volumes"]
        assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert submit["entrypoint"][:3] == ["ray", "job", "submit"]
    assert submit["entrypoint"][submit["entrypoint"].index("--runtime-env") + 1] == "configs/ray/runtime_env.yaml"
    assert (REPO / submit["entrypoint"][submit["entrypoint"].index("--runtime-env") + 1]).is_file()
    assert submit["command"][:3] == ["pmc", "unlearn", "unlearn/gemma-3-12b"]
    assert (REPO / "configs" / "unlearn" / "gemma-3-12b.yaml").is_file()


def _documented_commands(prefix: str) -> list[list[str]]:
    """The command lines of docs/scale-out.md (where the docker and Ray job commands are shown)."""
    text = (REPO / "docs" / "scale-out.md").read_text()
    return [shlex.split(line.split("#")[0]) for line in text.splitlines() if line.startswith(prefix)]


def test_docs_show_the_compose_commands_that_exist():
    commands = _documented_commands("docker compose")
    assert len(commands) >= 4
    services = set(COMPOSE["services"])
    for command in commands:
        assert command[2:4] == ["-f", "docker/compose.yaml"], command
        named = [word for word in command[5:] if not word.startswith("-") and word in services | {"pmc"}]
        assert all(word in services for word in named if word != "pmc"), command
    verbs = {command[4] for command in commands}
    assert {"build", "up", "run", "down"} <= verbs
    assert ["ray-head", "ray-worker"] == [w for w in next(c for c in commands if c[4] == "up") if w in services]


def test_docs_ray_job_submit_matches_the_runtime_env_and_test():
    commands = _documented_commands("ray job submit")
    assert commands, "docs/scale-out.md shows no `ray job submit` command"
    for command in commands:
        assert "--working-dir" in command and command[command.index("--working-dir") + 1] == "."
        assert command[command.index("--runtime-env") + 1] == "configs/ray/runtime_env.yaml"
        assert command[command.index("--") + 1] == "pmc"
    runtime_env = yaml.safe_load((REPO / "configs" / "ray" / "runtime_env.yaml").read_text())
    assert "/.venv/" in runtime_env["excludes"] and "env_vars" in runtime_env
