"""Waiting on several actors at once: results in order, and the first failure named at once.

Shared by the trainer group (ranks) and the rollout client (engines): each names the failing actor
with its own error type through `make_error(index, cause)`."""

from __future__ import annotations

from typing import Any, Callable

import ray

ROOT_CAUSE_WAIT_S = 2.0


def failure_message(actor: str, method: str, cause: BaseException) -> str:
    """One line for an actor's failed call: "<actor> died in <method> (...)" when its process is gone
    (Ray's text is then about Ray, not us), else "<actor> failed in <method>: <Type>: <first line>"."""
    if isinstance(cause, ray.exceptions.RayActorError):
        return f"{actor} died in {method} ({type(cause).__name__}: its Ray actor process is gone)"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{actor} failed in {method}: {type(cause).__name__}: {(lines[0] if lines else '')[:300]}"


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
            index, err = _root_cause(index_of[ready[0]], err, pending, index_of)
            raise make_error(index, actor_cause(err)) from err
    return results


def _root_cause(index: int, err: ray.exceptions.RayError, pending: list[ray.ObjectRef],
                index_of: dict[ray.ObjectRef, int]) -> tuple[int, ray.exceptions.RayError]:
    """A peer stuck in a collective with a dead actor fails too, sometimes first: name the dead one
    if Ray reports a death among the other calls within ROOT_CAUSE_WAIT_S."""
    if isinstance(err, ray.exceptions.RayActorError) or not pending:
        return index, err
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=ROOT_CAUSE_WAIT_S)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as death:
            return index_of[ref], death
        except ray.exceptions.RayError:
            continue
    return index, err
