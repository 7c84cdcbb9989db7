"""`s1serve` command line. Engine flags are generated from `EngineConfig`, one flag per field."""

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import time
import types
import typing

from .api.config import ServerConfig
from .engine.config import EngineConfig
from .errors import InvalidConfigError


def field_comments(config_cls) -> dict[str, str]:
    """The comment after each field of a dataclass (`name: type = value  # comment`): one source of
    truth for the code and for `--help`."""
    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        match = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if match:
            comments[match[1]] = match[2]
    return comments


def add_config_flags(parser: argparse.ArgumentParser, config_cls, overrides_only: bool = False) -> None:
    """One `--field-name` flag per dataclass field, typed and defaulted from the dataclass, its help
    the field's comment. With `overrides_only`, a flag not given leaves no attribute, so it
    overrides a config file only when set."""
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    group = parser.add_argument_group(f"{config_cls.__name__} flags")
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = argparse.SUPPRESS if overrides_only else field.default
        shown = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{comments.get(field.name, '')} (default: {shown})".replace("%", "%%").strip()
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper(), help=help_text)


def add_budget_flags(parser: argparse.ArgumentParser, title: str) -> None:
    budget = parser.add_argument_group(title)
    budget.add_argument("--min-think", type=int, help="append Wait instead of ending thinking before this many tokens")
    budget.add_argument("--max-think", type=int, help="force the end of thinking at this many tokens")
    budget.add_argument("--max-waits", type=int, help="at most this many Waits")
    budget.add_argument("--wait", help='the string appended instead of a premature end (default "Wait")')


def config_from_args(args: argparse.Namespace, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def resolve_model_dir(model: str | None) -> str:
    """A model directory as given, or the embedded default model for None / "default"."""
    if model and model != "default":
        return model
    from .models.default_model import default_model_dir

    return str(default_model_dir())


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import LLMEngine, SamplingParams, ThinkBudget

    budget = None  # the request's own checks come before the model loads
    if any(v is not None for v in (args.min_think, args.max_think, args.max_waits, args.wait)):
        budget = ThinkBudget(min_think=args.min_think, max_think=args.max_think, max_waits=args.max_waits, wait=args.wait)
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.sampling_seed,
        stop=tuple(args.stop),
    )
    engine = LLMEngine(resolve_model_dir(args.model), config_from_args(args, EngineConfig))
    prompt = args.prompt
    if not args.raw and engine.tokenizer.chat_template:
        prompt = engine.render_chat([{"role": "user", "content": prompt}])
    engine.add_request("cli", prompt, sampling, budget)
    show = PhasePrinter(sys.stdout) if budget else None
    start, num_tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        for delta in engine.step():
            if show:
                show(delta)
            else:
                sys.stdout.write(delta.new_text)
            sys.stdout.flush()
            num_tokens += len(delta.new_token_ids)
            last = delta
    elapsed = time.perf_counter() - start
    usage = f"{num_tokens} tokens in {elapsed:.2f} s, {num_tokens / elapsed:.1f} tok/s, finish: {last.finish_reason}"
    if budget:
        usage += (f"; thinking {last.think_tokens} tokens, answer {last.answer_tokens}, waits {last.num_waits}"
                  f"{', think end forced' if last.think_end_forced else ''}")
    print(f"\n[{usage}]", file=sys.stderr)
    return 0


class PhasePrinter:
    """Streams a budgeted reply with its phases visibly apart: a header per phase, the engine's
    inserted Waits in [brackets], a note where the think end was forced."""

    def __init__(self, out):
        self.out = out
        self.phase = None

    def __call__(self, delta) -> None:
        if self.phase is None:
            self.out.write("── thinking ──\n")
            self.phase = "think"
        if delta.think_text:
            waited = "WAIT_INSERTED" in delta.events
            self.out.write(f"[{delta.think_text}]" if waited else delta.think_text)
        if self.phase == "think" and delta.phase == "answer":
            forced = " (think end forced at max_think)" if "THINK_END_FORCED" in delta.events else ""
            self.out.write(f"\n── answer{forced} ──\n")
            self.phase = "answer"
        self.out.write(delta.answer_text)


API_KEY_ENV = "S1SERVE_API_KEY"


def server_config(args: argparse.Namespace) -> ServerConfig:
    """Flags, with the API key from $S1SERVE_API_KEY when --api-key is not given (so a Kubernetes
    Secret reaches the server without appearing on its command line)."""
    config = config_from_args(args, ServerConfig)
    if config.api_key is None:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidConfigError("--tls-cert and --tls-key go together")
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from .api.serve import S1Server

    config = server_config(args)
    engine_config = dataclasses.asdict(config_from_args(args, EngineConfig))  # validated before the model loads
    config.check_ports_free()
    server = S1Server(resolve_model_dir(args.model), config, engine_config)
    return uvloop.run(server.serve_forever())


def cmd_ask(args: argparse.Namespace) -> int:
    import grpc

    from clients import S1Client

    budget = dict(min_think=args.min_think, max_think=args.max_think, max_waits=args.max_waits, wait_string=args.wait)
    kwargs = dict(messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
                  temperature=args.temperature, seed=args.sampling_seed, budget=not args.no_think,
                  **({} if args.no_think else budget))
    show, usage = PhasePrinter(sys.stdout), None
    try:
        with S1Client(args.server, api_key=args.api_key) as client:
            for chunk in client.stream(**kwargs):
                if args.no_think:
                    sys.stdout.write(chunk.answer_text)
                else:
                    show(chunk)
                sys.stdout.flush()
                usage = chunk.usage or usage
    except grpc.RpcError as err:
        print(f"s1serve: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    if usage:
        print(f"\n[{usage.completion_tokens} tokens, thinking {usage.think_tokens}, answer {usage.answer_tokens}, "
              f"waits {usage.num_waits}{', think end forced' if usage.think_end_forced else ''}, "
              f"finish: {usage.finish_reason}, {usage.total_time_s:.2f} s]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clients.errors import TaskError
    from clients.eval import OfflineBackend, ServerBackend, SweepConfig, load_task, run_sweep

    def int_list(flag: str, text: str | None) -> list[int]:
        try:
            return [int(b) for b in text.split(",")] if text else []
        except ValueError:
            raise TaskError(f"{flag}: expected comma-separated integers, got {text!r}") from None

    try:
        cfg = SweepConfig(budgets=int_list("--budgets", args.budgets), min_think=args.min_think, max_waits=args.max_waits,
                          samples=args.samples, temperature=args.temperature, seed=args.sampling_seed,
                          answer_tokens=args.answer_tokens, rejection_tries=args.compare_rejection,
                          concurrency=args.concurrency, parallel=int_list("--parallel", args.parallel),
                          parallel_max_think=args.parallel_max_think, parallel_temperature=args.parallel_temperature,
                          adaptive=int_list("--adaptive", args.adaptive), adaptive_every=args.adaptive_every,
                          adaptive_agree=args.adaptive_agree, adaptive_probe_tokens=args.adaptive_probe_tokens)
        questions = load_task(args.task, args.grader, args.limit)
    except TaskError as exc:
        print(f"s1serve: error: {exc}", file=sys.stderr)
        return 2
    if args.server:
        backend = ServerBackend(args.server, args.api_key)
    else:
        backend = OfflineBackend(resolve_model_dir(args.model), **dataclasses.asdict(config_from_args(args, EngineConfig)))
    summary = run_sweep(questions, cfg, backend, Path(args.out), resume=args.resume)
    for method, scores in summary["methods"].items():
        print(f"{method}: control {scores['control']:.2f}, scaling {scores['scaling_per_1k_tokens']:+.3f}/1k thinking tokens"
              f" ({scores['scaling_per_1k_total_tokens']:+.3f}/1k total), performance {scores['performance']:.3f}")
        for p in scores["per_budget"]:
            point = f"n {p['budget']:>6}" if method == "parallel_vote" else f"budget {p['budget']:>6}"
            print(f"  {point}: accuracy {p['accuracy']:.3f}, thinking mean {p['mean_think_tokens']:.0f} "
                  f"p90 {p['p90_think_tokens']:.0f}, waits {p['mean_waits']:.2f}, total tokens {p['mean_total_tokens']:.0f}")
    print(f"results in {args.out}/ (results.jsonl, summary.json, *.png)")
    return 0


def cmd_build_dataset(args: argparse.Namespace) -> int:
    from dataset_builder.pipeline import build, load_pipeline_config

    result = build(load_pipeline_config(args.config, num_proc=args.num_proc, out=args.out))
    print(" -> ".join(f"{stage}: {count:,}" for stage, count in result["funnel"].to_json()["funnel"]))
    print(f"wrote {', '.join(str(p) for p in result['paths'].values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s1serve", description="Serve reasoning models with s1 budget forcing.")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: WARNING)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line (time, level, logger, message and, for finished"
                        " requests, their fields), for log collectors (default: text)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a reply to one prompt, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, help="generated tokens in all, thinking included (default: --default-max-tokens;"
                     " with a budget, the think limit + the forced end + --default-max-tokens for the answer)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's rule over prompt and output (default: 1, off)")
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_budget_flags(gen, "think budget (s1 budget forcing; any of these turns it on)")
    add_config_flags(gen, EngineConfig)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve gRPC and OpenAI-compatible REST on one engine")
    serve.add_argument("--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    add_config_flags(serve, ServerConfig)
    add_config_flags(serve, EngineConfig)
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser("ask", help="ask a running server (gRPC) and stream the reply, think and answer apart")
    ask.add_argument("prompt")
    ask.add_argument("--server", default="localhost:50051", help="gRPC address")
    ask.add_argument("--api-key")
    ask.add_argument("--max-tokens", type=int, help="generated tokens in all, thinking included (default: the server's)")
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--sampling-seed", type=int, default=None)
    ask.add_argument("--no-think", action="store_true", help="no think phase (the model answers directly)")
    add_budget_flags(ask, "think budget")
    ask.set_defaults(func=cmd_ask)

    ev = sub.add_parser("eval", help="budget sweep: accuracy against thinking tokens, the s1 scores, plots")
    ev.add_argument("task", help="task file (JSONL / Parquet / save_to_disk dir) or the bundled 'arith'")
    where = ev.add_mutually_exclusive_group()
    where.add_argument("--server", help="gRPC address of a running server (feedback is sent there)")
    where.add_argument("--model", help="run offline on this model directory (default: the embedded model)")
    ev.add_argument("--api-key")
    ev.add_argument("--budgets", default="256,512,1024,2048,4096", help="max_think values, increasing")
    ev.add_argument("--min-think", type=int, help="also force thinking up to this (capped at each budget)")
    ev.add_argument("--max-waits", type=int)
    ev.add_argument("--samples", type=int, default=1, help="runs per question and budget")
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--sampling-seed", type=int, default=0)
    ev.add_argument("--answer-tokens", type=int, default=512, help="room for the answer after thinking")
    ev.add_argument("--grader", help="math | multiple_choice | exact | normalized | code (default: the task's)")
    ev.add_argument("--limit", type=int, help="only the first N questions")
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--compare-rejection", type=int, default=0, metavar="K",
                    help="also run length rejection sampling with up to K tries")
    ev.add_argument("--parallel", metavar="N,N,...", help="also parallel scaling: n samples per question with a"
                    " majority vote, for each n (e.g. 1,2,4,8)")
    ev.add_argument("--parallel-max-think", type=int, help="thinking budget of each parallel sample (default: the first"
                    " of --budgets)")
    ev.add_argument("--parallel-temperature", type=float, default=0.7, help="(default: 0.7)")
    ev.add_argument("--adaptive", metavar="CAP,CAP,...", help="also adaptive thinking (stop when probes agree), for"
                    " each max_think cap")
    ev.add_argument("--adaptive-every", type=int, default=64, help="thinking tokens between probes (default: 64)")
    ev.add_argument("--adaptive-agree", type=int, default=3, help="agreeing probes that end thinking (default: 3)")
    ev.add_argument("--adaptive-probe-tokens", type=int, default=24, help="answer tokens per probe (default: 24)")
    ev.add_argument("--out", default="eval-out")
    ev.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.jsonl")
    add_config_flags(ev, EngineConfig)
    ev.set_defaults(func=cmd_eval)
    build = sub.add_parser("build-dataset", help="the s1K curation pipeline: sources -> filters -> traces -> s1K files")
    build.add_argument("config", help="pipeline config (YAML or TOML)")
    build.add_argument("--num-proc", type=int, help="worker processes for the CPU stages")
    build.add_argument("--out", help="output directory (overrides the config's `out`)")
    build.set_defaults(func=cmd_build_dataset)

    train = sub.add_parser("train", help="s1 SFT on trl: an s1K-schema dataset -> a model directory to serve")
    from trainer.cli import add_train_arguments

    add_train_arguments(train)
    return parser


class JsonLogFormatter(logging.Formatter):
    """A log record as one JSON line; `extra={"fields": {...}}` on a call adds machine-readable fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    converter = time.gmtime


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Runs a parsed command (`args.func`) with logging set up; our errors become exit code 2."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if getattr(args, "log_format", "text") == "json" else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    from .errors import S1ServeError

    try:
        return args.func(args)
    except S1ServeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "s1serve")


if __name__ == "__main__":
    sys.exit(main())
