"""`pmc sweep <unlearn config> key=a,b,c other=x,y [seeds=K] [max_concurrent=N] [sweep_dir=DIR]`: a grid
of full `pmc unlearn` trials scheduled by Ray Tune, then one table and the Pareto plot of all of them.

    plan_sweep     the sweep dir must be new, empty or this same sweep's (its sweep.yaml, written before
                   any trial, names the base config, grid and seeds); Hydra's override syntax expands the
                   grid (`key=a,b,c`, `choice(...)`, `range(...)`; `key=v` is fixed for every trial);
                   each point x seed is a trial with its own run dir `<sweep_dir>/<settings>`; every
                   trial's config and inputs are checked before any starts.
                   A trial whose run dir is complete is skipped, one with a checkpoint resumes from it.
    run_sweep      Ray Tune runs the other trials on the job's Ray cluster (RAY_ADDRESS or local); each
                   trial reserves one placement group holding its driver, engines and trainer ranks; a
                   failed trial is reported and the others go on
    summary_rows   a row per trial (settings, last scores, status, run dir) for sweep_dir.write_summary

The sweep dir itself (its marker, the table, the Pareto plot, written without replacing what the
sweep did not write) is sweep_dir.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pmc_pipeline import config as config_module
from pmc_pipeline.errors import ConfigError, Interrupted, PMCError, first_line
from pmc_pipeline.recipes.sweep_dir import (MARKER, SUMMARY_FILES, format_table, read_marker, sweep_identity,
                                            trial_scores, write_marker, write_summary)
from pmc_pipeline.schema import SweepConfig, UnlearnConfig

log = logging.getLogger(__name__)

@dataclass
class Trial:
    name: str  # also its run dir's name: the point's settings, filesystem-safe
    settings: list[str]  # the point's `key=value` overrides (seed last)
    run_dir: Path
    config: dict[str, Any]  # the resolved unlearn config the trial runs (a plain dict: Tune ships it to a worker)
    state: str  # "complete" (skipped), "resume" (from its last checkpoint) or "new"


def split_arguments(arguments: list[str]) -> tuple[SweepConfig, list[str]]:
    """The sweep's own options (SweepConfig's keys) and the grid's overrides."""
    own = {f"{name}=" for name in SweepConfig.__dataclass_fields__}
    options = [a for a in arguments if a.startswith(tuple(own))]
    grid = [a for a in arguments if a not in options]
    return config_module.load_config("sweep", None, options), grid


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """Every point of the grid as `key=value` overrides, in the order given (the last key varies fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"sweep override: {first_line(exc)}") from None
    axes = []
    for override in parsed:
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        axes.append([f"{override.key_or_group}={value}" for value in values])
    return [list(point) for point in itertools.product(*axes)]


def trial_name(settings: list[str]) -> str:
    """A readable, filesystem-safe name for a point's settings (hashed when very long)."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(settings)).strip("-") or "base"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def plan_sweep(config: str, sweep: SweepConfig, grid: list[str]) -> tuple[Path, list[Trial]]:
    """The sweep dir and its trials, each config loaded and checked (bad input fails before any trial runs)."""
    from pmc_pipeline.recipes.unlearn import check_unlearn
    from pmc_pipeline.recipes.unlearn_run_dir import prepare_run_dir

    if any(item.split("=", 1)[0].strip() in ("run_dir", "resume") for item in grid):
        raise ConfigError("run_dir and resume are set by the sweep (one run dir per trial under sweep_dir)")
    if sweep.seeds > 1 and "seed" in {item.split("=", 1)[0].strip() for item in grid}:
        raise ConfigError("seed is both in the grid and set by seeds=; use one of them")
    sweep_dir = Path(sweep.sweep_dir or Path("runs") / f"sweep-{Path(config).stem}").resolve()
    read_marker(sweep_dir, sweep_identity(config, sweep, grid))  # a folder that is not this sweep's: refused first
    swept = _swept_keys(grid)
    trials = []
    for point in expand_grid(grid):
        first_seed = config_module.load_config("unlearn", config, [*point, "run_dir=unset"]).seed
        for offset in range(sweep.seeds):
            seed = [f"seed={first_seed + offset}"] if sweep.seeds > 1 else []
            settings = [s for s in point if s.split("=", 1)[0] in swept] + seed
            name = trial_name(settings)
            run_dir = sweep_dir / name
            cfg: UnlearnConfig = config_module.load_config("unlearn", config, [*point, *seed, f"run_dir={run_dir}"])
            if not cfg.evaluation.eval_every:  # the table needs the final scores: evaluate the last epoch
                cfg.evaluation.eval_every = cfg.epochs
            try:
                state = prepare_run_dir(run_dir, cfg)
                if state == "resume":
                    cfg.resume = str(run_dir)
                if state != "complete":
                    check_unlearn(cfg)
            except PMCError as exc:
                raise PMCError(f"trial {name}: {exc}") from None
            trials.append(Trial(name, settings, run_dir, config_module.to_dict(cfg), state))
    if len({t.name for t in trials}) != len(trials):
        raise ConfigError(f"the grid {' '.join(grid)} repeats a point")
    return sweep_dir, trials


def _swept_keys(grid: list[str]) -> set[str]:
    """The keys that take more than one value (the others are the same in every trial, so not in its name)."""
    points = [dict(s.split("=", 1) for s in point) for point in expand_grid(grid)]
    return {key for key in points[0] if len({p[key] for p in points}) > 1}


def run_sweep(config: str, arguments: list[str]) -> Path:
    """Run the sweep `pmc sweep <config> <arguments>` describes; returns the sweep dir (summary files in it)."""
    sweep, grid = split_arguments(arguments)
    sweep_dir, trials = plan_sweep(config, sweep, grid)
    to_run = [t for t in trials if t.state != "complete"]
    log.info("sweep %s: %d trial(s), %d already complete, %d to run", sweep_dir, len(trials),
             len(trials) - len(to_run), len(to_run))
    identity = sweep_identity(config, sweep, grid)
    if not (sweep_dir / MARKER).is_file():  # new (plan_sweep checked it): claim it before any trial writes there
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_marker(sweep_dir, {**identity, "products": {}})
    failures: dict[str, str] = {}
    if to_run:
        failures = _run_with_tune(sweep_dir, to_run, sweep.max_concurrent)
    rows = write_summary(sweep_dir, summary_rows(trials, failures), identity)
    print(format_table(rows))
    print(f"\nwritten: {', '.join(str(sweep_dir / f) for f in SUMMARY_FILES)}")
    if failures:
        raise PMCError(f"{len(failures)} of {len(trials)} trial(s) failed: "
                       + "; ".join(f"{name}: {error}" for name, error in failures.items())
                       + "; run the same sweep again to retry them (completed trials are skipped)")
    return sweep_dir


def _run_with_tune(sweep_dir: Path, trials: list[Trial], max_concurrent: int) -> dict[str, str]:
    """Each trial as a Ray Tune trial in its own placement group; returns {trial name: error} of failed ones."""
    from ray import tune

    from pmc_pipeline.runtime.session import init_ray

    first = trials[0].config["resources"]
    init_ray(first["ray_address"], first["num_cpus"])
    by_name = {t.name: t.config for t in trials}
    trainable = tune.with_resources(tune.with_parameters(_trial, configs=by_name, cwd=os.getcwd()),
                                    lambda point: _trial_resources(by_name[point["trial"]]))
    with _stop_on_signals() as stopper:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(storage_path=str(sweep_dir / "tune"), verbose=1, stop=stopper,
                                      name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}"),
        )
        results = tuner.fit()
    if stopper.signal_number is not None:
        raise Interrupted(f"interrupted by {signal.Signals(stopper.signal_number).name}; run the same `pmc sweep` "
                          "again to continue (completed trials are skipped, interrupted ones resume from their "
                          "last checkpoint)", stopper.signal_number)
    return {result.config["trial"]: first_line(_root_cause(result.error)) for result in results if result.error}


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Any]:
    """A Tune stopper that ends the whole sweep once SIGINT or SIGTERM arrived: Tune stops the running
    trials and their actors. (An exception raised by a signal handler, as the other commands do, would
    surface inside Ray's C extension as a SystemError.)"""
    from ray import tune

    class SignalStopper(tune.Stopper):
        signal_number: int | None = None

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return self.signal_number is not None

        def stop_all(self) -> bool:
            return self.signal_number is not None

    stopper = SignalStopper()
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.getsignal(n) for n in numbers]
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's own would replace this one for SIGINT

    def record(number: int, frame: Any) -> None:
        stopper.signal_number = stopper.signal_number or number

    for number in numbers:
        signal.signal(number, record)
    try:
        yield stopper
    finally:
        for number, handler in zip(numbers, previous):
            signal.signal(number, handler)


def _trial_resources(cfg: dict[str, Any]) -> Any:
    from ray import tune

    from pmc_pipeline.runtime.placement import job_bundles, plan_from_config

    trial_cfg = config_module.from_mapping("unlearn", cfg)
    bundles, _ = job_bundles(plan_from_config(trial_cfg, config_module.use_gpus(trial_cfg)))
    return tune.PlacementGroupFactory(bundles, strategy=trial_cfg.resources.placement_strategy.upper())


def _trial(point: dict[str, str], configs: dict[str, dict[str, Any]], cwd: str) -> None:
    """One Tune trial: `pmc unlearn` of the trial's config in the trial's placement group."""
    import ray
    from ray import tune

    from pmc_pipeline.recipes.roles import open_session
    from pmc_pipeline.recipes.unlearn import run_unlearning

    os.chdir(cwd)  # Tune starts trials in a folder of its own; relative paths in the config mean the user's
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = config_module.from_mapping("unlearn", configs[point["trial"]])
    with open_session(cfg, job_group=ray.util.get_current_placement_group()) as session:
        result = run_unlearning(cfg, session)
    final = trial_scores(result.run_dir)
    tune.report({k: v for k, v in final.items() if isinstance(v, (int, float))})


def _root_cause(error: BaseException) -> BaseException:
    """The trial's own exception inside Ray's wrappers (a PMCError's one line is what the user needs)."""
    cause = getattr(error, "cause", None) or error.__cause__
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not error else error


def summary_rows(trials: list[Trial], failures: dict[str, str]) -> list[dict[str, Any]]:
    """One table row per trial: its settings, last scores, status and run dir."""
    rows = []
    for trial in trials:
        complete = (trial.run_dir / "summary.json").is_file() and trial.name not in failures
        status = ("failed: " + failures[trial.name] if trial.name in failures else
                  "complete (earlier run)" if trial.state == "complete" else "complete" if complete else "not run")
        rows.append({"trial": trial.name, "settings": trial.settings, **trial_scores(trial.run_dir),
                     "status": status, "run_dir": str(trial.run_dir)})
    return rows
