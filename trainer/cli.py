"""`s1serve train CONFIG [--field value ...]` and `python -m trainer CONFIG ...` (what
`accelerate launch -m trainer` runs on every process): the config file, then flags, then defaults."""

import argparse

from server.cli import add_config_flags, run_command

from .config import TrainConfig, load_config_file


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML / TOML / JSON file with TrainConfig fields (flags override it)")
    add_config_flags(parser, TrainConfig, overrides_only=True)
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> TrainConfig:
    fields = load_config_file(args.config) if args.config else {}
    fields.update({name: value for name, value in vars(args).items() if name in TrainConfig.__dataclass_fields__})
    return TrainConfig(**fields)


def run(args: argparse.Namespace) -> int:
    from .train import train

    outcome = train(config_from(args))
    m = outcome.metrics
    if outcome.is_main_process:
        print(f"trained {m['global_step']} steps in {m['wall_time_s']:.1f} s, loss {m['first_loss']} -> {m['final_loss']};"
              f" model in {outcome.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="s1 SFT on trl (TrainConfig fields as flags).")
    parser.add_argument("--log-level", default="INFO")
    add_train_arguments(parser)
    return run_command(parser.parse_args(argv), "trainer")
