"""Runs `pmc` command lines, each in its own forked process, for tests/test_bad_inputs.py.

Importing pmc and the libraries its commands reach (torch, transformers, vLLM) takes most of a fresh
`python -m pmc_pipeline.cli` on a small machine; this server imports them once, then for every
request (one JSON line on stdin: args, cwd, stdout and stderr file paths) forks a child that runs
`pmc_pipeline.cli.main(args)` exactly as the console script does, with its stdout and stderr going
to the given files, and answers one JSON line with the child's exit status.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

from pmc_pipeline import cli

# imported once here, inherited by every case (the vLLM model modules: the up-front architecture check)
PRELOADED = ("torch", "transformers", "datasets", "ray", "deepspeed", "vllm", "vllm.model_executor.models",
             "vllm.model_executor.models.llama")


def run_case(request: dict) -> int:
    """In the child: the command line with its own cwd, stdout and stderr."""
    os.chdir(request["cwd"])
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
        _, status = os.waitpid(pid, 0)
        answer({"returncode": os.waitstatus_to_exitcode(status), "pid": pid})


if __name__ == "__main__":
    serve()
