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


def test_generate_with_a_budget_shows_the_phases_apart(llama_dir, capsys):
    code = main(["generate", "2+2?", "--model", str(llama_dir), "--max-think", "5", "--max-tokens", "48",
                 "--num-kv-blocks", "32"])
    assert code == 0
    out, err = capsys.readouterr()
    assert out.startswith("── thinking ──\n")
    assert "── answer (think end forced at max_think) ──\n" in out
    assert "thinking 5 tokens" in err and "think end forced" in err


def test_phase_printer_marks_inserted_waits(llama_dir):
    """Deltas from a real engine whose model always tries to end thinking (biased delimiter)."""
    import io

    from server.cli import PhasePrinter
    from server.engine import LLMEngine, SamplingParams, ThinkBudget

    engine = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=32))
    delimiter = engine.think_ids.think_end[0]
    engine.add_request("r", "2+2?", SamplingParams(temperature=0, max_tokens=48, logit_bias={delimiter: 100}),
                       ThinkBudget(min_think=2, max_waits=5))
    buffer = io.StringIO()
    printer = PhasePrinter(buffer)
    while engine.has_unfinished():
        for delta in engine.step():
            printer(delta)
    assert buffer.getvalue().startswith("── thinking ──\n[Wait][Wait]\n── answer ──\n")


def test_serve_takes_the_api_key_from_the_environment_unless_a_flag_gives_one(monkeypatch):
    from server.cli import build_parser, server_config

    monkeypatch.setenv("S1SERVE_API_KEY", "from-env")
    assert server_config(build_parser().parse_args(["serve"])).api_key == "from-env"
    assert server_config(build_parser().parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv("S1SERVE_API_KEY")
    assert server_config(build_parser().parse_args(["serve"])).api_key is None
