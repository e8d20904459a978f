"""Sweep files, search spaces and sweep options: parsed and checked before Ray starts (fast)."""

from __future__ import annotations

import pytest

from launching import RESNET_TINY, launch_here
from trainkit.errors import ConfigError
from trainkit.launch.sweep import expand
from trainkit.launch.tune import options, space
from trainkit.launch.tune.driver import plan_sweep
from trainkit.launch.tune.space import Param

RAY = ["launcher=ray", "launcher.workers=1", "strategy=single"]


def plan(*args: str, config_dirs: list[str] = ()):
    name, keys, rest = options.split(list(args))
    return plan_sweep(options.load(name, keys, list(config_dirs)), rest, list(config_dirs))


def test_hydra_grammar_becomes_a_search_space():
    fixed, params = space.from_overrides([
        "recipe=resnet", "optim.lr=tag(log,interval(1e-4,0.1))", "optim.weight_decay=interval(0,0.01)",
        "model.width=8,16", "model.blocks=choice([1,1],[2,2])", "data.batch_size=tag(grid,choice(16,32))",
        "trainer.max_steps=range(2,5)",
    ])
    assert fixed == ["recipe=resnet"]
    assert params == [
        Param("optim.lr", "loguniform", low=1e-4, high=0.1),
        Param("optim.weight_decay", "uniform", low=0.0, high=0.01),
        Param("model.width", "choice", ("8", "16")),
        Param("model.blocks", "choice", ("[1,1]", "[2,2]")),
        Param("data.batch_size", "grid", ("16", "32")),
        Param("trainer.max_steps", "choice", ("2", "3", "4")),
    ]
    with pytest.raises(ConfigError, match="glob"):
        space.from_overrides(["strategy=glob(*)"])
    with pytest.raises(ConfigError, match="must be > 0"):
        space.from_overrides(["optim.lr=tag(log,interval(0,1))"])


def test_sweep_file_space_kinds_and_mistakes():
    params = space.from_yaml({"optim.lr": {"loguniform": [1e-3, 0.3]}, "model.blocks": {"grid": [[1, 1], [2, 2]]},
                              "trainer.compile": {"choice": [True, False]}})
    assert params[0] == Param("optim.lr", "loguniform", low=1e-3, high=0.3)
    assert params[1].values == ("[1,1]", "[2,2]") and params[2].values == ("true", "false")
    with pytest.raises(ConfigError, match="'normal' is unknown; valid: choice, grid, uniform, loguniform"):
        space.from_yaml({"optim.lr": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="low 1 must be below high 0.5"):
        space.from_yaml({"optim.lr": {"uniform": [1, 0.5]}})
    with pytest.raises(ConfigError, match=r"sweep.space.optim.lr must be one of"):
        space.from_yaml({"optim.lr": [0.1, 0.2]})


def test_the_shipped_sweep_file_plans(tmp_path):
    p = plan("sweep=resnet_lr", *RAY, f"run_dir={tmp_path}")
    o = p.options
    assert (o.search.name, o.scheduler.name, o.metric, o.mode, o.num_samples, o.max_concurrent) == (
        "optuna", "asha", "loss", "min", 8, 2)
    assert [x.key for x in p.params] == ["optim.lr", "optim.weight_decay", "model.width"]
    assert p.fixed[:2] == ["recipe=resnet", "trainer.max_steps=200"] and p.base == str(tmp_path)
    # The command line replaces the file's keys and adds to its space.
    p = plan("sweep=resnet_lr", "sweep.search=random", "sweep.scheduler=none", "sweep.num_samples=3",
             "optim.lr=0.1,0.2", "data.batch_size=tag(grid,choice(16,32))", *RAY)
    assert (p.options.search.name, p.options.scheduler.name, p.trials) == ("random", "none", 6)
    assert [x for x in p.params if x.key == "optim.lr"][0].values == ("0.1", "0.2")


def test_lists_only_sweep_is_hydras_grid(tmp_path):
    p = plan(*RESNET_TINY, *RAY, "optim.lr=0.1,0.2", "model.width=8,16", f"run_dir={tmp_path}")
    assert (p.options.search.name, p.options.num_samples, p.trials) == ("grid", 1, 4)


def test_grid_checks_number_trials_as_tune_does():
    """A bad grid trial is named by the number Tune gives it (Tune orders a grid by key name)."""
    from ray.tune.search.variant_generator import generate_variants

    from trainkit.launch.tune.driver import _grid_trials
    from trainkit.launch.tune.search import param_space

    params = [Param("model.width", "choice", ("8", "16")), Param("data.batch_size", "choice", ("16", "32", "64"))]
    tune_order = [[f"{p.key}={c[p.key]}" for p in params]
                  for _, c in generate_variants(param_space(params, grid_choices=True))]
    assert tune_order == _grid_trials(params)
    assert tune_order[1] == ["model.width=8", "data.batch_size=32"]


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.search='bayes' is unknown; valid: grid, optuna, random"):
        plan(*RAY, "sweep.search=bayes", "optim.lr=0.1,0.2")
    with pytest.raises(ConfigError, match=r"sweep.scheduler='pbt' is unknown; valid: asha, none"):
        plan(*RAY, "sweep.scheduler=pbt", "optim.lr=0.1,0.2")
    with pytest.raises(ConfigError, match=r"sweep='nope' is unknown; valid: .*resnet_lr"):
        plan(*RAY, "sweep=nope")
    with pytest.raises(ConfigError, match=r"unknown key 'sweep.scheduler.patience'; valid keys in sweep.scheduler: "
                                          r"name, grace_period, reduction_factor, max_t, brackets"):
        plan(*RAY, "sweep.scheduler=asha", "sweep.scheduler.patience=3", "optim.lr=0.1,0.2")
    with pytest.raises(ConfigError, match=r"sweep.mode='low' is not valid; valid: min, max"):
        plan(*RAY, "sweep.mode=low", "optim.lr=0.1,0.2")


def test_a_bad_sweep_fails_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="search=grid needs a finite list .*optim.lr is a range"):
        plan(*RAY, "sweep.search=grid", "optim.lr=interval(0.1,0.2)")
    with pytest.raises(ConfigError, match="search=optuna samples every key; model.width is a grid axis"):
        plan(*RAY, "sweep.search=optuna", "model.width=tag(grid,choice(8,16))")
    with pytest.raises(ConfigError, match="run_dir cannot be swept"):
        plan(*RAY, f"run_dir={tmp_path}/a,{tmp_path}/b")
    with pytest.raises(ConfigError, match="launcher.workers cannot be swept"):
        plan(*RAY, "launcher.workers=1,2")
    with pytest.raises(ConfigError, match="grace_period=500 is past the last step"):
        plan(*RAY, "trainer.max_steps=100", "sweep.scheduler=asha", "sweep.scheduler.grace_period=500",
             "optim.lr=interval(0.1,0.2)")
    # Every value is composed first: a bad one names itself (a grid names its trial).
    with pytest.raises(ConfigError, match=r"sweep optim.lr=-1.0: optim.lr=-1.0 must be > 0"):
        plan(*RAY, "optim.lr=interval(-1,0.2)")
    with pytest.raises(ConfigError, match=r"sweep trial 1 \(optim.lr=-1\)"):
        plan(*RAY, "optim.lr=0.1,-1")
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan(*RAY, "sweep.search=random")


def test_sweep_options_need_launcher_ray():
    proc = launch_here("-m", *RESNET_TINY, "sweep=resnet_lr")
    assert proc.returncode == 2 and "launcher=ray" in proc.stderr, proc.stderr


def test_grid_expansion_is_hydras_without_its_private_sweeper():
    """The local grid's order and values match Hydra's basic sweeper (last key fastest, a key
    given twice keeps its place and takes the later value)."""
    assert expand(["a=1,2", "b=x", "c=range(0,2)"]) == [["a=1", "b=x", "c=0"], ["a=1", "b=x", "c=1"],
                                                         ["a=2", "b=x", "c=0"], ["a=2", "b=x", "c=1"]]
    assert expand(["a=1,2", "b=x", "a=3"]) == [["a=3", "b=x"]]
    with pytest.raises(ConfigError, match="INTERVAL_SWEEP sweeps are sampled, which needs launcher=ray"):
        expand(["optim.lr=interval(0,1)"])

