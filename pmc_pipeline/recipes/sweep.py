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
    write_summary  sweep.md and sweep.json (settings, unlearn quality, utility, unlearning seconds, status,
                   run dir) and pareto.png (utility against unlearn quality, the dominating trials marked),
                   each staged under a hidden name and renamed; sweep.yaml keeps their hashes, so a file
                   the sweep did not write is never replaced
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
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
from pmc_pipeline.runtime.atomic import atomic_write_text
from pmc_pipeline.schema import SweepConfig, UnlearnConfig

log = logging.getLogger(__name__)

SUMMARY_FILES = ("sweep.md", "sweep.json", "pareto.png")
# written first: what the sweep is and the hashes of the summary files it wrote; no marker, no sweep's folder
MARKER = "sweep.yaml"


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
    from pmc_pipeline.recipes.unlearn import check_unlearn, prepare_run_dir

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
                cfg.evaluation.eval_every = cfg.pmc.epochs
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


def sweep_identity(config: str, sweep: SweepConfig, grid: list[str]) -> dict[str, Any]:
    """What makes a sweep the same sweep when run again (max_concurrent may change)."""
    return {"config": config, "grid": list(grid), "seeds": sweep.seeds}


def read_marker(sweep_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """sweep_dir's marker when it holds this same sweep, None when it is new or empty; anything else (a
    folder of other files, another sweep, a summary file the sweep did not write) is refused."""
    from omegaconf import OmegaConf

    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise PMCError(f"sweep_dir={sweep_dir} is a file; give a new folder")
    marker = sweep_dir / MARKER
    if not marker.is_file():
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise PMCError(f"sweep_dir={sweep_dir} already exists, is not empty and is not a pmc sweep's folder "
                           f"(no {MARKER}); choose a new sweep_dir (pmc never overwrites or deletes what is there)")
        return None
    saved = OmegaConf.to_container(OmegaConf.load(marker), resolve=True)
    changed = sorted(key for key in identity if saved.get(key) != identity[key])
    if changed:
        raise PMCError(f"sweep_dir={sweep_dir} holds another sweep ({', '.join(changed)} differ; see {marker}); "
                       "choose a new sweep_dir, or run that sweep's own command")
    for name in SUMMARY_FILES:
        if (sweep_dir / name).is_file() and _sha256(sweep_dir / name) not in saved["products"].get(name, []):
            raise PMCError(f"{sweep_dir / name} was not written by this sweep (or was changed since); move it away, "
                           "then run the sweep again (it writes a new one)")
    return saved


def _write_marker(sweep_dir: Path, content: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(sweep_dir / MARKER, OmegaConf.to_yaml(OmegaConf.create(content)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    if read_marker(sweep_dir, identity) is None:  # a new sweep: claim the folder before any trial writes into it
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_marker(sweep_dir, {**identity, "products": {}})
    failures: dict[str, str] = {}
    if to_run:
        failures = _run_with_tune(sweep_dir, to_run, sweep.max_concurrent)
    rows = write_summary(sweep_dir, trials, failures, identity)
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


def trial_scores(run_dir: Path) -> dict[str, Any]:
    """A trial's last evaluated unlearn quality and utility, its epochs and unlearning seconds."""
    from pmc_pipeline.eval.plots import UQ, UTILITY

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    scored = [line for line in lines if line.get(UQ) is not None]
    return {"unlearn_quality": scored[-1][UQ] if scored else None,
            "utility": scored[-1].get(UTILITY) if scored else None,
            "epochs": lines[-1]["epoch"] if lines else 0,
            "seconds": lines[-1].get("elapsed_seconds") if lines else None}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (unlearn quality, utility): True when no other point is at least as good in both and
    better in one (both are maximised)."""
    return [not any(a >= x and b >= y and (a > x or b > y) for a, b in points) for x, y in points]


def write_summary(sweep_dir: Path, trials: list[Trial], failures: dict[str, str],
                  identity: dict[str, Any]) -> list[dict[str, Any]]:
    """sweep.json, sweep.md and pareto.png from every trial's run dir; returns the table's rows.

    Each file is staged under a hidden name, its hash recorded in the marker, then renamed into place:
    a file there that the sweep did not write (its hash unknown) is refused, never replaced."""
    from pmc_pipeline.eval.plots import draw_trials_pareto

    rows = []
    for trial in trials:
        complete = (trial.run_dir / "summary.json").is_file() and trial.name not in failures
        status = ("failed: " + failures[trial.name] if trial.name in failures else
                  "complete (earlier run)" if trial.state == "complete" else "complete" if complete else "not run")
        rows.append({"trial": trial.name, "settings": trial.settings, **trial_scores(trial.run_dir),
                     "status": status, "run_dir": str(trial.run_dir)})
    scored = [r for r in rows if r["unlearn_quality"] is not None and r["utility"] is not None]
    for row, dominating in zip(scored, pareto_front([(r["unlearn_quality"], r["utility"]) for r in scored])):
        row["pareto"] = dominating
    staged = {name: sweep_dir / f".{name}.staged{Path(name).suffix}" for name in SUMMARY_FILES}
    try:
        staged["sweep.json"].write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        staged["sweep.md"].write_text(format_table(rows) + "\n", encoding="utf-8")
        draw_trials_pareto([(r["trial"], r["unlearn_quality"], r["utility"], r["pareto"]) for r in scored],
                           staged["pareto.png"])
        marker = read_marker(sweep_dir, identity)  # again: a file may have appeared while the trials ran
        new = {name: _sha256(path) for name, path in staged.items()}
        # the old and new hashes both count until the renames are done, so a crash between them refuses nothing
        _write_marker(sweep_dir, {**marker, "products": {n: [*marker["products"].get(n, []), h] for n, h in new.items()}})
        for name, path in staged.items():
            os.replace(path, sweep_dir / name)
        _write_marker(sweep_dir, {**marker, "products": {n: [h] for n, h in new.items()}})
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = ["| trial | settings | unlearn quality | utility | Pareto | epochs | unlearning s | status | run dir |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {' '.join(r['settings']) or '(base config)'} | {number(r['unlearn_quality'])} "
                     f"| {number(r['utility'])} | {'yes' if r.get('pareto') else ''} | {r['epochs']} "
                     f"| {number(r['seconds'])} | {r['status']} | {r['run_dir']} |")
    return "\n".join(lines)
