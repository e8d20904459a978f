"""``python -m trainkit.launch [-m] [--config-dir DIR] [--cfg] key=value ...``

Composes the recipe, validates it, prepares the embedded data set if needed, checks the
stores are reachable, then hands the workers to the chosen launcher. Exit codes: 0 done,
2 bad config or store, 75 preempted (relaunch the same command to resume), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from trainkit.errors import TrainkitError

USAGE = """python -m trainkit.launch [options] [key=value ...]

examples:
  python -m trainkit.launch recipe=resnet
  python -m trainkit.launch recipe=gpt strategy=fsdp launcher.workers=2 trainer.max_steps=50
  python -m trainkit.launch recipe=resnet run_dir=s3://bucket/runs/r1 data.url=s3://bucket/digits/train
"""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m trainkit.launch", usage=USAGE)
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep: comma-separated values run as separate trials")
    parser.add_argument("--config-dir", action="append", default=[], help="extra recipe directory (Hydra search path)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]}")
    return args, rest


def run(argv: list[str]) -> int:
    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare

    args, overrides = parse(argv)
    if args.multirun:
        from trainkit.launch.sweep import sweep

        return sweep(overrides, args.config_dir)
    cfg = compose_config(overrides, args.config_dir)
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())), end="")
        return 0
    prepare(cfg)
    from trainkit.launch import LAUNCHERS

    return LAUNCHERS.get(cfg.launcher.name, "launcher")(cfg)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
