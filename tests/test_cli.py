"""The CLI maps EngineConfig fields 1:1 onto flags and reports user errors without a traceback."""

import dataclasses

from server.cli import build_parser, config_from_args, main
from server.engine import EngineConfig


def test_every_engine_config_field_is_a_flag():
    args = build_parser().parse_args(
        ["generate", "hi", "--block-size", "32", "--num-kv-blocks", "100", "--no-enable-prefix-caching"]
    )
    config = config_from_args(args, EngineConfig)
    assert config.block_size == 32 and config.num_kv_blocks == 100 and not config.enable_prefix_caching
    defaults = config_from_args(build_parser().parse_args(["generate", "hi"]), EngineConfig)
    assert dataclasses.asdict(defaults) == dataclasses.asdict(EngineConfig())


def test_user_errors_exit_2_with_a_message(llama_dir, capsys):
    code = main(["generate", "", "--model", str(llama_dir), "--raw"])
    assert code == 2
    assert "prompt: must contain at least one token" in capsys.readouterr().err
