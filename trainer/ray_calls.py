"""Waiting on several actors at once: results in order, and the first failure named at once.

Shared by the trainer group (ranks) and the rollout client (engines): each names the failing actor
with its own error type through `make_error(index, cause)`."""

from __future__ import annotations

from typing import Any, Callable

import ray


def actor_cause(err: ray.exceptions.RayError) -> BaseException:
    """The exception raised inside the actor, when there was one (not when the actor died)."""
    return err.cause if isinstance(err, ray.exceptions.RayTaskError) else err


def wait_each(refs: list[ray.ObjectRef], timeout_s: float | None,
              make_error: Callable[[int, BaseException], Exception]) -> list[Any]:
    """Results by position; raises make_error(i, cause) for the first ref that fails or, after
    `timeout_s` for the whole call (None: Ray's own detection of dead actors only), is still pending."""
    index_of = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            stuck = sorted(index_of[ref] for ref in pending)
            raise make_error(stuck[0], TimeoutError(f"no answer within {timeout_s:.0f} s from {stuck}"))
        try:
            results[index_of[ready[0]]] = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            raise make_error(index_of[ready[0]], actor_cause(err)) from err
    return results
