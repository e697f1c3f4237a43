"""Runs `pmc` command lines, each in its own forked process, for the tests of the command line itself
(tests/test_bad_inputs.py, the signals of tests/test_faults_and_resume.py).

Importing pmc and the libraries its commands reach (torch, transformers, vLLM) takes most of a fresh
`python -m pmc_pipeline.cli` on a small machine; this server imports them once, then for every
request (one JSON line on stdin: args, cwd, environment additions, stdout and stderr file paths)
forks a child that runs `pmc_pipeline.cli.main(args)` exactly as the console script does, with its
stdout and stderr going to the given files, and answers one JSON line with the child's pid when it
starts and one with its exit status when it ends. `ForkedCLI` is the tests' side.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from pmc_pipeline import cli

# imported once here, inherited by every case (the vLLM model modules: the up-front architecture check)
PRELOADED = ("torch", "transformers", "datasets", "ray", "deepspeed", "vllm", "vllm.model_executor.models",
             "vllm.model_executor.models.llama")


def run_case(request: dict) -> int:
    """In the child: the command line with its own cwd, stdout and stderr."""
    os.chdir(request["cwd"])
    os.environ.update(request.get("env", {}))
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    try:
        code = cli.main(request["args"])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # an uncaught error is what the tests look for: a traceback, status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    # answers go out on the original stdout; whatever else writes to stdout (DeepSpeed's import does)
    # goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for module in PRELOADED:
        importlib.import_module(module)

    def answer(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            os._exit(run_case(request))
        answer({"started": pid})
        _, status = os.waitpid(pid, 0)
        answer({"returncode": os.waitstatus_to_exitcode(status), "pid": pid})


class ForkedCLI:
    """The tests' side: `run(args, cwd)` -> (exit status, stdout, stderr) of one `pmc` command line in its
    own process; `start` + `finish` for a test that signals the process while it runs."""

    def __init__(self, out_dir: Path, timeout_s: float = 180):
        self.out_dir, self.timeout_s = out_dir, timeout_s  # timeout_s: a hang check on every answer
        # its own session: a hung case is killed with the server's whole process group
        self.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, start_new_session=True)
        self._answer(timeout_s)  # ready

    def _answer(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout_s)
        if not ready:
            self.close()
            raise AssertionError(f"no answer from the pmc command within {timeout_s} s (a hang?)")
        return json.loads(self.server.stdout.readline())

    def start(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Start one command line; its pid. Its stderr is written to `self.stderr` as it runs."""
        self.stdout, self.stderr = self.out_dir / "stdout", self.out_dir / "stderr"
        request = {"args": args, "cwd": str(cwd), "env": env or {}, "stdout": str(self.stdout),
                   "stderr": str(self.stderr)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return self._answer(self.timeout_s)["started"]

    def finish(self, timeout_s: float | None = None) -> tuple[int, str, str]:
        code = self._answer(timeout_s or self.timeout_s)["returncode"]
        return code, self.stdout.read_text(), self.stderr.read_text()

    def run(self, args: list[str], cwd: Path) -> tuple[int, str, str]:
        self.start(args, cwd)
        return self.finish()

    def close(self) -> None:
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()


if __name__ == "__main__":
    serve()
