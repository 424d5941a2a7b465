"""``python -m llamagym_pl.sweep --config <fit yaml> --space <space yaml> [--trials 20] [-- <fit flags>]``.

An Optuna study (TPE sampler, a pruner) over ``fit`` settings. The search space, objective and
pruner are a YAML file (:mod:`llamagym_pl.sweep_space`); each trial is a normal ``fit`` of
``--config`` with the trial's settings as flags (the space's ``fixed`` ones, the flags after
``--``, then the searched ones), run in this process, with its own run directory
``<out>/trial-N`` (logs ``version_0/``, ``checkpoints/``; ``config.yaml`` in the log directory
holds its complete config). The objective is the trial's last greedy evaluation of the space's
``eval/*`` metric (final, not best: the model a trial ends with is the one it produced); each
evaluation is reported to Optuna, whose pruner may stop the trial there.

The study lives in a database (``--storage``, default ``sqlite:///runs/<study>.db``): rerunning
the command resumes it, and several processes (or machines sharing a database server) can run
trials of one study at once. ``--trials N`` runs trials until the study has N finished ones
(complete or pruned). At the end: a table of the study's trials, the best one, and ``best.yaml``
in ``<out>``: the best trial's complete config, for ``python -m llamagym_pl.fit --config``.

A space file that cannot work (unknown key, empty range, a value ``fit`` would refuse) stops the
sweep before any trial with one line and status 2; a trial whose config fails when it is built or
that aborts (:class:`~llamagym_pl.guards.LlamaGymError`) is marked FAIL with its one line, and the
sweep goes on.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import optuna
import sqlalchemy.exc
from jsonargparse import ArgumentParser, Namespace
from optuna.trial import FrozenTrial, TrialState

from llamagym_pl.checkpointing import defer_interrupts
from llamagym_pl.fit import SETUP_ERRORS, LlamaGymCLI, ParseOnlyCLI, build_cli, fit, make_cli
from llamagym_pl.guards import ConfigError, LlamaGymError
from llamagym_pl.sweep_report import format_params, trials_table
from llamagym_pl.sweep_space import Space, SpaceError, load_space, override_args

PROG = "llamagym_pl.sweep"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Keys the sweep sets itself for each trial: searching or fixing them would mix the trials' files.
RUN_DIR_KEYS = (
    "trainer.default_root_dir",
    "checkpoint.dirpath",
    "trainer.logger.init_args.save_dir",
    "trainer.logger.init_args.name",
    "ckpt_path",
)
HEARTBEAT_S = 60
"""A running trial writes a heartbeat this often; one silent for twice as long (its process was
killed) is marked FAIL when the study's next trial starts, in any process."""


class TrialFailed(Exception):
    """A trial that cannot run or finish (its config, or a fault past its limit): marked FAIL."""


# ----------------------------------------------------------------------------- trials
class ReportToTrial(L.Callback):
    """Reports each greedy evaluation's objective metric to the Optuna trial, and stops the fit
    (at the end of that epoch, so its checkpoint and logs are complete) when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.values: list[tuple[int, float]] = []  # (epochs trained, value)
        self.pruned = False
        self.eval_keys: list[str] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.eval_keys = sorted(k for k in metrics if k.startswith("eval/"))
        if self.metric not in metrics:
            return  # reported as the trial's error once fit returns
        step, value = trainer.current_epoch + 1, float(metrics[self.metric])
        self.values.append((step, value))
        self.trial.report(value, step=step)
        # At the last epoch stopping saves nothing, and the trial's final value is its result.
        if step < (trainer.max_epochs or 0) and self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


@dataclass(frozen=True)
class Sweep:
    """What every trial of this process shares."""

    space: Space
    base_args: list[str]  # --config <fit yaml>, the space's fixed settings, the flags after --
    out: Path
    logger_keys: frozenset[str]  # the run-directory keys the configured logger takes

    def trial_args(self, params: dict[str, Any], name: str) -> list[str]:
        """``fit`` flags of one run named ``name`` with ``params``, logging under ``out/name``."""
        run_dir = self.out / name
        dirs = {"trainer.default_root_dir": str(run_dir), "checkpoint.dirpath": str(run_dir / "checkpoints")}
        # TensorBoard (and W&B, CSV) put a run under save_dir/name: <out>/trial-N/version_0/.
        logger = {"save_dir": str(self.out), "name": name}
        dirs |= {f"trainer.logger.init_args.{k}": v for k, v in logger.items() if k in self.logger_keys}
        return [*self.base_args, *override_args(params), *override_args(dirs)]

    def objective(self, trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in self.space.params}
        name = f"trial-{trial.number}"
        trial.set_user_attr("run_dir", str(self.out / name))
        print(f"{PROG}: {name}: {format_params(params)}", file=sys.stderr, flush=True)
        report = ReportToTrial(trial, self.space.metric)
        try:
            cli = _build(self.trial_args(params, name))
        except TrialFailed as err:
            raise _failed(trial, str(err)) from None
        cli.trainer.callbacks.append(report)
        try:
            fit(cli)
        except LlamaGymError as err:  # a fault past its limit (e.g. non-finite losses)
            raise _failed(trial, str(err)) from None
        except SystemExit as err:  # Lightning's answer to Ctrl-C: stop the sweep, this trial FAIL
            raise KeyboardInterrupt from err
        finally:
            _finish_wandb(cli)
        if report.pruned:
            step, value = report.values[-1]
            raise optuna.TrialPruned(f"{self.space.metric} = {value:.4g} after {step} epochs")
        if not report.values:
            if report.eval_keys:
                raise _failed(
                    trial, f"{self.space.metric} was not logged; evaluation logs {report.eval_keys}"
                )
            raise _failed(
                trial,
                "no greedy evaluation ran: trainer.max_epochs must be at least "
                "trainer.check_val_every_n_epoch (evaluation runs every that many epochs)",
            )
        return report.values[-1][1]


def _build(args: list[str]) -> LlamaGymCLI:
    try:
        return build_cli(args, run_fit=False)
    except SETUP_ERRORS as err:  # a setting out of range, a model that cannot load ...
        raise TrialFailed(str(err)) from None
    except SystemExit as err:  # the parser's own error, printed above it
        raise TrialFailed(
            f"its config does not parse (exit status {err.code}; the parser's message is above)"
        ) from None


def _failed(trial: optuna.Trial, message: str) -> TrialFailed:
    trial.set_user_attr("error", message)
    return TrialFailed(message)


def _finish_wandb(cli: LlamaGymCLI) -> None:
    """End a trial's W&B run: Lightning's WandbLogger leaves it open, and the next trial's logger
    would log into it instead of starting its own."""
    for logger in cli.trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


class _NoTracebackForFailedTrials(logging.Filter):
    """Optuna logs a trial's error with its traceback; a :class:`TrialFailed` says all in its
    message, and Ctrl-C needs none (a traceback would bury the line that matters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrialFailed | KeyboardInterrupt):
            record.exc_info = None
        return True


# ----------------------------------------------------------------------------- checking
def check_space(space: Space, base_args: list[str]) -> tuple[LlamaGymCLI, Namespace]:
    """Parse the base config with every edge of the space (each range's ends, each choice) with
    ``fit``'s own parser, building nothing; :class:`SpaceError` on the first that fails.

    Returns the parse-only CLI (its parser dumps ``best.yaml``) and the base config.
    """
    kwargs = {"exit_on_error": False, "allow_abbrev": False}  # raise, and no prefix matching of keys
    try:
        checker = make_cli(base_args, ParseOnlyCLI, parser_kwargs=kwargs)
    except ArgumentError as err:
        raise SpaceError(
            f"the base config with the space's fixed settings does not parse: {_one_line(err)}"
        ) from None
    where = f"search space {space.path}"
    for key in [*space.fixed, *(p.key for p in space.params)]:
        if key in RUN_DIR_KEYS:
            raise SpaceError(
                f"{where}: {key} is set by the sweep (each trial starts afresh in its own directory)"
            )
    for param in space.params:
        for value in param.edge_values():
            try:
                parsed = checker.parser.parse_args([*base_args, *override_args({param.key: value})])
            except ArgumentError as err:
                raise SpaceError(f"{where}: {param.key} = {value!r}: {_one_line(err)}") from None
            if param.key not in parsed:  # a group (model) or a class's init_args hold several keys
                raise SpaceError(f"{where}: {param.key} is not a single fit setting")
    return checker, checker.config


def _one_line(err: Exception) -> str:
    # jsonargparse explains a type error over several lines; the first two say what and where.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])


# ----------------------------------------------------------------------------- results
def write_best(sweep: Sweep, checker: LlamaGymCLI, study: optuna.Study, best: FrozenTrial) -> Path:
    """The best trial's complete config (as parsed by ``fit``'s parser, every default filled in),
    with run directories of its own (``<out>/best``) so training it again overwrites no trial."""
    cfg = checker.parser.parse_args(sweep.trial_args(best.params, "best"))
    path = sweep.out / "best.yaml"
    metric = sweep.space.metric
    path.write_text(
        f"# {PROG}: trial {best.number} of study {study.study_name}, {metric} = {best.value:+.4f}\n"
        f"# python -m llamagym_pl.fit --config {path}\n" + checker.parser.dump(cfg, skip_none=False)
    )
    return path


# ----------------------------------------------------------------------------- command line
def make_parser() -> ArgumentParser:
    description = (
        "An Optuna study over fit settings: each trial is a fit of --config with the space file's "
        "fixed settings, the fit flags after --, and the trial's sampled settings."
    )
    parser = ArgumentParser(prog=PROG, description=description, exit_on_error=True)
    parser.add_argument("--config", type=str, required=True, help="The fit config every trial starts from.")
    parser.add_argument("--space", type=str, required=True, help="The search-space YAML file.")
    parser.add_argument(
        "--trials", type=int, default=20, help="Run trials until the study has this many finished."
    )
    parser.add_argument("--study_name", type=str | None, default=None, help="Default: the space file's stem.")
    parser.add_argument(
        "--storage",
        type=str | None,
        default=None,
        help="Optuna database URL (default sqlite:///runs/<study>.db).",
    )
    parser.add_argument(
        "--out", type=str | None, default=None, help="Trial run directories (default runs/<study>)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the TPE sampler.")
    return parser


def main(argv: list[str] | None = None) -> optuna.Study:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Trials run fit's CLI in this process with an args list, by design; the sweep's own argv is
    # not for it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    fit_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = make_parser().parse_args(argv[: len(argv) - len(fit_flags) - (1 if "--" in argv else 0)])
    try:
        space = load_space(args.space)
        if args.trials < 1:
            raise SpaceError(f"--trials {args.trials} must be at least 1")
        base_args = ["--config", args.config, *override_args(space.fixed), *fit_flags]
        checker, base = check_space(space, base_args)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    logger = base.get("trainer.logger")
    logger_keys = (
        frozenset(logger.init_args.keys())
        if isinstance(logger, Namespace) and logger.get("init_args")
        else frozenset()
    )
    study_name = args.study_name or Path(args.space).stem
    out = Path(args.out or f"runs/{study_name}")
    sweep = Sweep(space, base_args, out, logger_keys)
    try:
        study = _open_study(study_name, args.storage or f"sqlite:///runs/{study_name}.db", space, args.seed)
    except (ValueError, ImportError, optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise SystemExit(f"{PROG}: error: {_one_line(err)}") from None
    out.mkdir(parents=True, exist_ok=True)
    _run(study, sweep, args.trials)
    print(trials_table(study))
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not finished:
        raise SystemExit(f"{PROG}: error: no trial of study {study_name!r} completed")
    best = study.best_trial
    print(f"best: trial {best.number}, {space.metric} = {best.value:+.4f}, {format_params(best.params)}")
    print(f"best config: {write_best(sweep, checker, study, best)} (python -m llamagym_pl.fit --config it)")
    return study


def _open_study(name: str, url: str, space: Space, seed: int) -> optuna.Study:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = _storage(url)
    study = optuna.create_study(
        storage=storage, study_name=name, direction=space.direction, pruner=space.pruner, load_if_exists=True
    )
    if study.direction.name.lower() != space.direction:
        raise ValueError(
            f"study {name!r} in {url} was created to {study.direction.name.lower()}, not {space.direction}"
        )
    # Reproducible, yet a resumed study does not sample its first trials' settings again: a new
    # study's sampler is seeded with --seed, a resumed one's with --seed mixed with the number of
    # trials it has (mixed, not added: --seed 1 on a new study and --seed 0 after one trial
    # would sample alike).
    trials = len(study.get_trials(deepcopy=False))
    mixed = int(np.random.SeedSequence([seed, trials]).generate_state(1)[0])
    study.sampler = space.sampler(seed if trials == 0 else mixed)
    return study


def _storage(url: str, tries: int = 5) -> optuna.storages.RDBStorage:
    for attempt in range(tries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S)
        except sqlalchemy.exc.DBAPIError:
            # Processes started together on a new database race to create its tables ("table
            # studies already exists", "UNIQUE constraint failed: alembic_version"); once one
            # has, the others find them.
            if attempt == tries - 1:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _run(study: optuna.Study, sweep: Sweep, target: int) -> None:
    """Trials until the study has ``target`` finished ones (counting other processes' trials)."""
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= target:
        print(f"{PROG}: the study already has {done} finished trials (--trials {target}): none to run")
        return
    optuna_log = logging.getLogger("optuna")
    quiet = _NoTracebackForFailedTrials()
    optuna_log.addFilter(quiet)
    for handler in optuna_log.handlers:
        handler.addFilter(quiet)
    defer_interrupts()  # Ctrl-C stops a trial at its next step (the trial is marked FAIL)
    try:
        study.optimize(
            sweep.objective,
            n_trials=target - done,  # at most; other processes' trials count toward target too
            catch=(TrialFailed,),
            callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED)],
            gc_after_trial=True,  # the next trial builds its own model: free this one's first
        )
    except KeyboardInterrupt:
        raise SystemExit(
            f"{PROG}: interrupted; the trial in progress is marked FAIL, rerun to go on"
        ) from None
    finally:
        optuna_log.removeFilter(quiet)
        for handler in optuna_log.handlers:
            handler.removeFilter(quiet)


if __name__ == "__main__":
    main()
