"""The sweep YAML of ``bptt sweep --config conf/sweep/NAME.yaml``: parsed, checked against the base
training config, and turned into Ray Tune's search space, scheduler and search algorithm.

A sweep file::

    name: quickstart                      # experiment name: Tune's directory, MLflow's parent run
    base: conf/lm/quickstart.yaml         # the training config every trial starts from
    overrides: {trainer.max_steps: 600}   # dotted keys set in every trial
    space:                                # dotted keys sampled per trial
      task.optimizer.init_args.lr: {loguniform: [0.001, 0.01]}
      model.hidden_size: {choice: [128, 256]}
      seed_everything: {grid: [0, 1]}     # also: uniform [lo, hi], randint [lo, hi)
    metric: val/loss
    mode: min
    scheduler: {type: asha, grace_period: 2}   # fifo | asha | pbt (perturbs `mutations`, default: space)
    search: {type: optuna}                # optional: optuna | hyperopt (pip install 'bptt[optuna]')
    num_samples: 4
    max_concurrent_trials: 2              # default: as many as the cluster's resources hold
    resources: {num_workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}
    stop: {training_iteration: 20}        # any Tune stop condition (time_total_s, a metric bound)
    failure: {trial_retries: 2, worker_retries: 3}
    storage_path: null                    # default ~/ray_results; shared FS or s3://... on several nodes
    tracking: {tracking_uri: null, experiment_name: quickstart-sweep}

Relative paths (``base``) resolve against the sweep file's directory, else the working directory.
The command line overrides any key of the sweep file and of its base config, as if the file said so
(``apply_overrides``): ``bptt sweep --config FILE --num_samples 2 --scheduler.max_t 3 --trainer.max_steps 40``.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from bptt.config.trust import check_args, check_config
from bptt.errors import ConfigError
from bptt.metric_names import VAL_LOSS

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_CHECKPOINTS_TO_KEEP = 2
FIT_KEYS = ("seed_everything", "trainer", "model", "task", "data", "tracking", "checkpoint")  # a `bptt fit` config's
KEYED_BY_CONFIG_KEY = ("space", "overrides", "scheduler.mutations")  # mappings whose keys are dotted config keys
FIT_HELP = "; `bptt fit --help` lists every key and type"  # bptt.config.parser.one_line's hint: no sweep file's


@dataclass
class Scheduler:
    """``fifo`` runs every trial to its stop condition; ``asha`` stops the worse trials early
    (per reported validation); ``pbt`` copies the better trials' checkpoints into the worse ones
    every ``perturbation_interval`` reports and perturbs ``mutations`` (default: the space); with
    ``synch`` every trial waits at each perturbation point until the others reach it, so the worse
    ones are always replaced, however far apart the trials started (Tune's synchronous PBT)."""

    type: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 100
    perturbation_interval: int = 2
    mutations: dict[str, Any] | None = None
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False


@dataclass
class Search:
    """A model-based search algorithm in place of random/grid sampling."""

    type: Literal["optuna", "hyperopt"] = "optuna"
    seed: int | None = None


@dataclass
class Resources:
    """Per trial: ``num_workers`` data-parallel Ray Train workers with these resources each.
    The trial's driver process only launches and watches its workers: with ``driver_cpus: 0`` it
    takes no CPU and runs on the head node (the node least likely to go away), as Ray advises."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.0
    check: bool = True  # fail before any trial when no node can hold a worker (off for autoscaling clusters)


@dataclass
class Failure:
    """``trial_retries``: a failed trial restarts from its last checkpoint this often (Tune);
    ``worker_retries``: a dead worker restarts the trial's workers from the last checkpoint (Train)."""

    trial_retries: int = 2
    worker_retries: int = 3


@dataclass
class Tracking:
    tracking_uri: str | None = None
    experiment_name: str | None = None


@dataclass
class SweepSpec:
    name: str
    base: str
    space: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = VAL_LOSS
    mode: Literal["min", "max"] = "min"
    scheduler: Scheduler = field(default_factory=Scheduler)
    search: Search | None = None
    num_samples: int = 1
    seed: int | None = 0  # of the sampling (Tune's random search, or the search algorithm's); null: unseeded
    max_concurrent_trials: int | None = None
    resources: Resources = field(default_factory=Resources)
    stop: dict[str, float] = field(default_factory=dict)
    failure: Failure = field(default_factory=Failure)
    checkpoints_to_keep: int | None = None  # per trial; default 2, and every one under PBT
    storage_path: str | None = None
    tracking: Tracking = field(default_factory=Tracking)
    # not a sweep-file key: set by load_sweep from --trust-config, carried to every trial
    trusted = False  # unannotated: a class attribute, not a dataclass field

    def train_checkpoints_to_keep(self) -> int:
        """Ray Train's checkpoints kept per trial run: ``checkpoints_to_keep``, by default 2."""
        return self.checkpoints_to_keep or DEFAULT_CHECKPOINTS_TO_KEEP

    def tune_checkpoints_to_keep(self) -> int | None:
        """Tune's checkpoints kept per trial: as Train's, except that under PBT all are kept unless set:
        a clone adopts the donor's checkpoint while the donor trains on, and Tune deletes an adopted
        checkpoint when either trial moves past its limit, so with quick reports the checkpoint being
        cloned can be gone before the clone has started."""
        if self.checkpoints_to_keep is None and self.scheduler.type == "pbt":
            return None
        return self.train_checkpoints_to_keep()


def load_sweep(
    path: str | Path, text: str | None = None, *, overrides: list[str] | None = None, trusted: bool = False
) -> tuple[SweepSpec, str]:
    """Read and check a sweep file (or its saved ``text``), with the command line's ``overrides`` on top:
    (spec, base config path).

    Every check that needs no cluster happens here: the import paths the sweep file, its base config
    and the overrides name (``bptt.config.trust``; any, when ``trusted``, which the spec then carries to
    every trial), keys and types of the sweep file, the distributions, the scheduler and search
    algorithm, and that each space key is a key of the base config taking the values the space
    can draw, values its constructors accept (the DataModule, network and task built without data).

    Args:
        overrides: ``--key value`` or ``--key=value`` words (``apply_overrides``): keys of the sweep file
            (``--num_samples 2``, ``--scheduler.max_t 3``) and of its base config (``--trainer.max_steps 40``).

    Raises:
        ConfigError: one line naming the problem and the fix.
    """
    path = Path(path)
    raw = _read(path, text)
    source = str(path)
    if overrides:
        apply_overrides(raw, overrides, trusted=trusted)
        source = f"{path} with {shlex.join(overrides)}"
    check_config(raw, source=f"sweep file {path}", trusted=trusted, base=path.parent)
    spec = _parse(raw, source, trusted)
    base = _resolve(spec.base, path)
    if not spec.space:
        raise ConfigError(f"{source}: space is empty; give at least one dotted key with a distribution")
    for key, dist in spec.space.items():
        _check_distribution(source, key, dist)
    if spec.scheduler.type == "pbt":
        for key, dist in (spec.scheduler.mutations or {}).items():
            _check_distribution(source, key, dist)
    _check_search(source, spec)
    _check_numbers(source, spec)
    _check_against_base(source, spec, base)
    return spec, str(base)


def _read(path: Path, text: str | None) -> dict[str, Any]:
    """The sweep file (or its saved ``text``) as YAML data."""
    from bptt.config.parser import one_line

    if text is None:
        if not path.is_file():
            raise ConfigError(f"sweep file {path} does not exist; pass e.g. --config conf/sweep/quickstart.yaml")
        text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({one_line(err).removesuffix(FIT_HELP)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with at least name, base and space")
    return raw


def _parse(raw: dict[str, Any], source: str, trusted: bool) -> SweepSpec:
    """The sweep file's keys and types, checked by jsonargparse against ``SweepSpec``."""
    from jsonargparse import ArgumentParser

    from bptt.config.parser import one_line

    # config values stay as written (jsonargparse would build the objects of class_path entries)
    verbatim = {k: raw.pop(k) for k in ("space", "overrides") if k in raw}
    scheduler_raw = raw.get("scheduler")
    mutations = scheduler_raw.pop("mutations", None) if isinstance(scheduler_raw, dict) else None
    for key, value in [*verbatim.items(), ("scheduler.mutations", mutations or {})]:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of dotted config keys, got {value!r}")
    parser = ArgumentParser(prog="bptt sweep", exit_on_error=False)
    parser.add_class_arguments(SweepSpec, "sweep")
    try:
        spec_ns = parser.parse_object({"sweep": raw})
        spec: SweepSpec = parser.instantiate_classes(spec_ns).sweep
        spec.space, spec.overrides = verbatim.get("space", {}), verbatim.get("overrides", {})
        spec.trusted = trusted
        spec.scheduler.mutations = mutations
    except Exception as err:  # jsonargparse: unknown key, wrong type, a value outside a Literal
        raise ConfigError(f"{source}: {one_line(err).replace(FIT_HELP, '')}"
                          "; see conf/sweep/quickstart.yaml for the keys") from None
    return spec


def _check_search(source: str, spec: SweepSpec) -> None:
    """A search algorithm that combines with the scheduler and the space, and whose package is installed."""
    if spec.search is None:
        return
    if spec.scheduler.type == "pbt":
        raise ConfigError(f"{source}: a search algorithm cannot drive PBT; drop search or use scheduler asha/fifo")
    if any(_kind(d) == "grid" for d in spec.space.values()):
        raise ConfigError(f"{source}: grid values do not combine with search {spec.search.type}; use choice")
    module = {"optuna": "optuna", "hyperopt": "hyperopt"}[spec.search.type]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(
            f"search {spec.search.type} needs the {module} package; pip install 'bptt[{module}]' or drop search"
        ) from None


def override_pairs(words: list[str]) -> list[tuple[str, str]]:
    """``["--a", "1", "--b=2"]`` -> ``[("a", "1"), ("b", "2")]``.

    Raises:
        ConfigError: a word that is not a ``--key``, or a key without a value.
    """
    pairs, i = [], 0
    while i < len(words):
        word = words[i]
        key, equals, value = word[2:].partition("=")
        if not word.startswith("--") or not key:
            raise ConfigError(f"bptt sweep takes overrides as --key value pairs, e.g. --num_samples 2 or "
                              f"--trainer.max_steps=40; {word!r} is not a --key")
        if not equals:
            if i + 1 == len(words) or words[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value; pass --{key} VALUE or --{key}=VALUE")
            i, value = i + 1, words[i + 1]
        pairs.append((key, value))
        i += 1
    return pairs


def is_sweep_key(key: str) -> bool:
    """Whether a dotted override names a key of the sweep file (else one of its base config's).
    ``tracking`` is in both: ``tracking.tracking_uri`` and ``tracking.experiment_name`` are the sweep's."""
    top, _, rest = key.partition(".")
    if top == "tracking":
        return not rest or rest in {f.name for f in fields(Tracking)}
    return top in {f.name for f in fields(SweepSpec)}


def apply_overrides(raw: dict[str, Any], overrides: list[str], *, trusted: bool = False) -> None:
    """Put the command line's ``--key value`` overrides into a sweep file's data ``raw``, as if the file
    said so: a sweep file key takes the value read as YAML (``--scheduler.max_t 3``,
    ``--space.model.hidden_size '{choice: [64, 128]}'``); a key of the base config (``FIT_KEYS``)
    joins the file's ``overrides`` as text, which ``bptt fit``'s parser reads (``--trainer.max_steps 40``).
    Every value is checked against the allow-list first, as ``bptt fit`` checks its command line.

    Raises:
        ConfigError: a malformed override, a key of neither, a base config key that the space samples,
            a value that is not YAML, or code outside the allow-list.
    """
    pairs = override_pairs(overrides)
    check_args(overrides, trusted=trusted)
    for key, value in pairs:
        if not is_sweep_key(key):
            _override_base(raw, key, value)
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or " ".join(str(err).split())[:200]
            raise ConfigError(f"override --{key} {value!r} is not a YAML value ({problem}); write it as YAML, "
                              "e.g. '{choice: [16, 32]}'") from None
        _set(raw, key, parsed)


def _override_base(raw: dict[str, Any], key: str, value: str) -> None:
    """A base config key into the sweep file's ``overrides`` (``_check_against_base`` checks it there)."""
    if key.partition(".")[0] not in FIT_KEYS:
        sweep_keys = ", ".join(f.name for f in fields(SweepSpec))
        raise ConfigError(f"override --{key} is neither a sweep file key ({sweep_keys}) nor a training config "
                          f"key ({', '.join(FIT_KEYS)}); fix the key (`bptt fit --help` lists the training keys)")
    space = raw.get("space")
    if isinstance(space, dict) and key in space:
        raise ConfigError(f"override --{key} sets a key that the sweep samples (space); drop it, or replace its "
                          f"distribution: --space.{key} '{{choice: [{value}]}}'")
    overrides = raw.get("overrides")
    raw["overrides"] = {**(overrides if isinstance(overrides, dict) else {}), key: value}


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b] = value`` for ``key`` ``a.b``; below a mapping of dotted config keys (``KEYED_BY_CONFIG_KEY``)
    the rest of ``key`` is one key."""
    node, walked, rest = raw, "", key
    while walked not in KEYED_BY_CONFIG_KEY and "." in rest:
        name, rest = rest.split(".", 1)
        walked = f"{walked}.{name}" if walked else name
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            raise ConfigError(f"override --{key}: {walked} is {node[name]!r}, not a mapping; override "
                              f"--{walked} as a whole")
        node = node[name]
    node[rest] = value


def _check_pbt_keeps_read_layout(source: str, mutations: dict[str, Any], data: Any) -> None:
    """PBT continues a better trial's checkpoint under the worse trial's perturbed config: a checkpoint's
    read position counts batches of its own data layout (the DataModule's ``READ_LAYOUT``), which
    ``bptt resume`` refuses to change."""
    layout = getattr(data, "READ_LAYOUT", ())
    for key in mutations:
        if key.startswith("data.") and key.split(".", 1)[1] in layout:
            raise ConfigError(
                f"{source}: PBT would perturb {key}, but a trial continues another trial's checkpoint whose read "
                f"position counts batches of its own {key}; keep it out of scheduler.mutations (and out of space "
                "when mutations is not given), or use scheduler asha or fifo"
            )


def _check_pbt_keeps_model_shapes(source: str, key: str, built: list[tuple[Any, dict[str, tuple[int, ...]]]]) -> None:
    """PBT continues a better trial's checkpoint under the worse trial's perturbed config: its weights
    must fit the network that config builds. ``built``: values of ``key`` and their parameter shapes."""
    (first, shapes), *others = built
    for value, other in others:
        differing = [k for k in {**shapes, **other} if shapes.get(k) != other.get(k)]  # in the network's order
        if differing:
            raise ConfigError(
                f"{source}: PBT would perturb {key}, but {key}={first!r} and {value!r} build parameters of other "
                f"shapes (at {differing[0]}) and a trial continues another trial's checkpoint; keep it out of "
                "scheduler.mutations (and out of space when mutations is not given), or use scheduler asha or fifo"
            )


def _check_numbers(source: str, spec: SweepSpec) -> None:
    """Every count, size, resource and bound of the sweep file within what Tune and Ray accept
    (jsonargparse has checked the types; a value out of range would otherwise pass until Ray runs)."""
    r, s, f = spec.resources, spec.scheduler, spec.failure
    search_seed = spec.search.seed if spec.search is not None else None
    seed_range = ">= 0 and < 2**32 (or null), as numpy's seeds are"
    rules: list[tuple[str, Any, bool, str]] = [
        ("num_samples", spec.num_samples, spec.num_samples >= 1, ">= 1"),
        ("max_concurrent_trials", spec.max_concurrent_trials,
         spec.max_concurrent_trials is None or spec.max_concurrent_trials >= 1, ">= 1 (or left out)"),
        ("checkpoints_to_keep", spec.checkpoints_to_keep,
         spec.checkpoints_to_keep is None or spec.checkpoints_to_keep >= 1, ">= 1 (or left out)"),
        ("seed", spec.seed, spec.seed is None or 0 <= spec.seed < 2**32, seed_range),
        ("search.seed", search_seed, search_seed is None or 0 <= search_seed < 2**32, seed_range),
        ("resources.num_workers", r.num_workers, r.num_workers >= 1, ">= 1"),
        *((f"resources.{name}", value, _is_quantity(value), ">= 0 and finite: 0, or at least 0.0001 (Ray's unit)")
          for name, value in (("cpus_per_worker", r.cpus_per_worker), ("gpus_per_worker", r.gpus_per_worker),
                              ("driver_cpus", r.driver_cpus))),
        ("failure.trial_retries", f.trial_retries, f.trial_retries >= -1, ">= 0, or -1 for no limit"),
        ("failure.worker_retries", f.worker_retries, f.worker_retries >= -1, ">= 0, or -1 for no limit"),
        ("scheduler.grace_period", s.grace_period, s.grace_period >= 1, ">= 1"),
        ("scheduler.max_t", s.max_t, s.max_t >= max(s.grace_period, 1), ">= 1 and >= scheduler.grace_period"),
        ("scheduler.reduction_factor", s.reduction_factor, math.isfinite(s.reduction_factor) and s.reduction_factor > 1,
         "> 1 and finite"),
        ("scheduler.perturbation_interval", s.perturbation_interval, s.perturbation_interval >= 1, ">= 1"),
        ("scheduler.quantile_fraction", s.quantile_fraction, 0 <= s.quantile_fraction <= 0.5, "from 0 to 0.5"),
        ("scheduler.resample_probability", s.resample_probability, 0 <= s.resample_probability <= 1, "from 0 to 1"),
        *((f"stop.{key}", value, math.isfinite(value), "a finite number") for key, value in spec.stop.items()),
    ]
    for key, value, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"{source}: {key} must be {requirement}, got {value!r}")


def _is_quantity(value: float) -> bool:
    """A Ray resource amount: Ray counts in units of 0.0001 and refuses negative amounts."""
    return math.isfinite(value) and (value == 0 or value >= 0.0001)


def _resolve(base: str, sweep_file: Path) -> Path:
    for candidate in (sweep_file.parent / base, Path(base)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"base config {base} not found next to {sweep_file} or in {Path.cwd()}; fix `base:`")


def _kind(dist: Any) -> str | None:
    return next(iter(dist)) if isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS else None


def _check_distribution(source: str, key: str, dist: Any) -> None:
    kind = _kind(dist)
    if kind is None:
        raise ConfigError(
            f"{source}: space key {key!r} must be one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {dist!r}"
        )
    values = dist[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {key}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise ConfigError(f"{source}: {key}: {kind} takes [low, high] with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{source}: {key}: loguniform needs low > 0, got {values!r}")


def _samples(dist: dict[str, list]) -> list[Any]:
    """Values a distribution can draw that are worth type-checking: all listed ones, or the bounds."""
    kind, values = next(iter(dist.items()))
    if kind == "randint":
        return [int(values[0]), int(values[1]) - 1]
    return list(values)


def as_args(settings: dict[str, Any]) -> list[str]:
    """``{"model.hidden_size": 256}`` -> ``["--model.hidden_size", "256"]`` (values as JSON, strings bare)."""
    out: list[str] = []
    for key, value in settings.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def trial_args(base: str, spec: SweepSpec, sampled: dict[str, Any]) -> list[str]:
    """The ``bptt fit`` arguments of one trial (``base``: the base config's path or its YAML text)."""
    return ["--config", base, *as_args(spec.overrides), *as_args(sampled)]


def _check_against_base(source: str, spec: SweepSpec, base: Path) -> None:
    from bptt.config.parser import build_parser, build_without_data, parameter_shapes, parse_config
    from bptt.training.checks import check_window_fits

    parser = build_parser()
    try:
        built_base = build_without_data(parse_config(trial_args(str(base), spec, {}), parser, trusted=spec.trusted))
        check_window_fits(built_base)
    except ConfigError as err:
        raise ConfigError(f"{source}: base config with the sweep's overrides: {err}") from None
    perturbed = pbt_mutations(spec)
    _check_pbt_keeps_read_layout(source, perturbed, built_base.data)
    keys = {**spec.space, **(spec.scheduler.mutations or {} if spec.scheduler.type == "pbt" else {})}
    for key, dist in keys.items():
        if key in spec.overrides:
            raise ConfigError(f"{source}: {key!r} is both in overrides and in space; keep one")
        built = []
        for value in _samples(dist):
            try:
                trial = build_without_data(parse_config(trial_args(str(base), spec, {key: value}), parser,
                                                        trusted=spec.trusted))  # the constructors' checks
                check_window_fits(trial)
                if key in perturbed and key.startswith("model."):
                    built.append((value, parameter_shapes(trial.model)))
            except ConfigError as err:
                raise ConfigError(f"{source}: space key {key!r} = {value!r} does not fit {base.name}: {err}") from None
        if built:
            _check_pbt_keeps_model_shapes(source, key, built)


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The sweep's distributions as Ray Tune search-space objects, keyed by dotted config key."""
    from ray import tune

    make = {
        "choice": lambda v: tune.choice(v),
        "grid": lambda v: tune.grid_search(v),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[_kind(dist)](dist[_kind(dist)]) for key, dist in space.items()}


def pbt_mutations(spec: SweepSpec) -> dict[str, Any]:
    """What PBT perturbs: ``scheduler.mutations``, else the space's sampled (not grid) keys; none without PBT."""
    if spec.scheduler.type != "pbt":
        return {}
    return spec.scheduler.mutations or {k: d for k, d in spec.space.items() if _kind(d) != "grid"}


def scheduler(spec: SweepSpec) -> Any:
    """Ray Tune's trial scheduler for ``spec.scheduler``."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    s = spec.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=tune_space(pbt_mutations(spec)),
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch)
    return FIFOScheduler()


def search_algorithm(spec: SweepSpec, max_concurrent: int = 0) -> Any:
    """Optuna or HyperOpt over the space, else Tune's own random/grid sampling, seeded by ``seed``.

    ``max_concurrent`` (0: no limit) goes to Tune's own sampler here: Tune applies
    ``TuneConfig.max_concurrent_trials`` only to a ``Searcher`` (Optuna, HyperOpt), and ignores it,
    with a warning, for a ``BasicVariantGenerator``. Every started trial is RUNNING to Tune, also
    while its Train workers wait for resources, so without the limit all trials start at once."""
    seed = spec.search.seed if spec.search is not None and spec.search.seed is not None else spec.seed
    if spec.search is None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    if spec.search.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def resolved_config(base: str, spec: SweepSpec, sampled: dict[str, Any]) -> str:
    """One trial's whole training config as YAML (``base``: the base config's path or text)."""
    from bptt.config.parser import build_parser, parse_config

    parser = build_parser()
    return parser.dump(parse_config(trial_args(base, spec, sampled), parser, trusted=spec.trusted))
