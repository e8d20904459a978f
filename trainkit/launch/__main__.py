"""``python -m trainkit.launch [-m] [--config-dir DIR] [--config-name NAME] [--cfg job|hydra|all] key=value ...``
``python -m trainkit.launch script=train.py [key=value ...] [-- script arguments]``

Composes the recipe (or, with ``script=``, the settings for a script of one's own; see
:mod:`trainkit.launch.script`), validates it, prepares the embedded data set if needed, checks the
stores are reachable, then hands the job to the chosen launcher (trainkit.launch.base).
Exit codes: 0 done, 2 bad config or store, 75 preempted (relaunch the same command to
resume), 1 otherwise. The flags are Hydra's, so a Hydra user types what they know.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from trainkit.errors import ConfigError, TrainkitError

USAGE = """python -m trainkit.launch [options] [key=value ...]

examples:
  python -m trainkit.launch recipe=resnet
  python -m trainkit.launch recipe=gpt strategy=fsdp launcher.workers=2 trainer.max_steps=50
  python -m trainkit.launch recipe=resnet run_dir=s3://bucket/runs/r1 data.url=s3://bucket/digits/train
  python -m trainkit.launch --cfg job recipe=gpt strategy=fsdp       # print the resolved config
  python -m trainkit.launch script=train.py launcher.workers=2 run_dir=runs/mine -- --lr 0.1
"""
CFG_KINDS = ("job", "hydra", "all")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m trainkit.launch", usage=USAGE, add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="list the config groups and their options")
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep: comma-separated values run as separate trials")
    parser.add_argument("-cd", "--config-dir", action="append", default=[], help="extra recipe directory (Hydra search path)")
    parser.add_argument("-cn", "--config-name", default="config", help="primary config in the search path (default: config)")
    parser.add_argument("-c", "--cfg", choices=CFG_KINDS, help="print the composed config (job, hydra or all) and exit")
    # Hydra allows a bare --cfg in older habits; it means the job's config.
    argv = [*argv]
    for i, arg in enumerate(argv):
        if arg in ("-c", "--cfg") and (i + 1 == len(argv) or argv[i + 1] not in CFG_KINDS):
            argv.insert(i + 1, "job")
            break
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]}")
    return args, rest


def show_config(kind: str, overrides: list[str], config_dirs: list[str], config_name: str) -> str:
    """The composed config as YAML, credentials hidden (and said to be)."""
    from omegaconf import OmegaConf

    from trainkit.launch.compose import compose_config, compose_raw
    from trainkit.redact import HIDDEN, redact

    parts = []
    if kind in ("job", "all"):
        cfg = compose_config(overrides, config_dirs, config_name=config_name)
        shown = redact(cfg.to_dict())
        text = OmegaConf.to_yaml(OmegaConf.create(shown))
        if HIDDEN in text:
            parts.append(f"# credential-like values are shown as {HIDDEN}; the run uses the real ones\n")
        parts.append(text)
    if kind in ("hydra", "all"):
        hydra = compose_raw(overrides, config_dirs, config_name=config_name, with_hydra=True).hydra
        parts.append(OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hydra)})))
    return "".join(parts)


def help_text(config_dirs: list[str], config_name: str) -> str:
    from trainkit.config import Config
    from trainkit.launch.compose import COMPONENT_SECTIONS, component_options, group_choices

    lines = [USAGE, "Config groups (pick with group=option):"]
    for group, choices in group_choices(config_dirs, config_name=config_name).items():
        lines.append(f"  {group}: {', '.join(choices)}")
    lines.append("")
    lines.append("Options of each choice (set with group.key=value):")
    for group, entries in component_options().items():
        for name, cls in entries.items():
            opts = " ".join(f"{f.name}={getattr(cls(), f.name)!r}" for f in dataclasses.fields(cls) if f.name != "name")
            lines.append(f"  {group}={name}: {opts or '(none)'}")
    lines.append("")
    lines.append("Sections (every key: --cfg job):")
    for f in dataclasses.fields(Config):
        if f.name in COMPONENT_SECTIONS:
            continue
        value = getattr(Config(), f.name)
        keys = ", ".join(x.name for x in dataclasses.fields(value)) if dataclasses.is_dataclass(value) else ""
        lines.append(f"  {f.name}{': ' + keys if keys else ''}")
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> int:
    from trainkit.components import LAUNCHERS
    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare
    from trainkit.launch.script import pop_script, split_argv

    argv, script_args = split_argv(argv)
    args, overrides = parse(argv)
    script, overrides = pop_script(overrides)
    if script:
        return run_script(script, script_args, overrides, args)
    if script_args:
        raise ConfigError(f"arguments after -- ({' '.join(script_args)}) go to a script: add script=PATH")
    if args.help:
        print(help_text(args.config_dir, args.config_name), end="")
        return 0
    if args.cfg:
        print(show_config(args.cfg, overrides, args.config_dir, args.config_name), end="")
        return 0
    if args.multirun:
        from trainkit.launch.sweep import sweep

        return sweep(overrides, args.config_dir)
    cfg = compose_config(overrides, args.config_dir, config_name=args.config_name)
    prepare(cfg)
    result = LAUNCHERS.get(cfg.launcher.name, "launcher")().run(cfg)
    if result.exit_code not in (0, 75) and result.message:
        print(f"error: {result.message}", file=sys.stderr)
    return result.exit_code


def run_script(path: str, script_args: list[str], overrides: list[str], args: argparse.Namespace) -> int:
    """A user's script on the chosen launcher, through the same launcher code as a recipe."""
    from trainkit.components import LAUNCHERS
    from trainkit.launch import script
    from trainkit.launch.compose import compose_data
    from trainkit.launch.prepare import prepare_script

    if args.multirun or args.cfg:
        raise ConfigError(f"script= runs one job; {'-m' if args.multirun else '--cfg'} is for recipes")
    script.check_script(path, overrides)
    data = compose_data(overrides, args.config_dir, config_name=args.config_name)
    cfg = script.launcher_config(data, overrides)
    job = script.settings(data, overrides)
    prepare_script(cfg, named_run_dir="run_dir" in job)
    with script.environment(path, script_args, job):
        result = LAUNCHERS.get(cfg.launcher.name, "launcher")().run(cfg)
    if result.exit_code not in (0, 75) and result.message:
        print(f"error: {result.message}", file=sys.stderr)
    return result.exit_code


def main(argv: list[str] | None = None) -> None:
    from trainkit.redact import scrub

    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
    except TrainkitError as exc:
        # Credentials given as overrides must not reach a log through an error line.
        print(f"error: {scrub(str(exc), _override_secrets(argv))}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _override_secrets(argv: list[str]) -> list[str]:
    from trainkit.redact import is_credential

    return [v for k, _, v in (a.partition("=") for a in argv) if is_credential(k.rsplit(".", 1)[-1]) and v]


if __name__ == "__main__":
    main()
