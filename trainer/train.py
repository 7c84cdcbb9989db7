"""The s1 SFT run on trl's SFTTrainer: load, render, train, and write a Hugging Face directory
that `s1serve serve --model` loads as is, with the run's metrics and effective settings beside it.

Launch on one process (`s1serve train CONFIG`), or on many with `accelerate launch --config_file
trainer/configs/fsdp_1x8.yaml -m trainer CONFIG` (or `torchrun`): the world size comes from the
launcher's environment and the gradient accumulation keeps the global batch what the config says.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data import OverlongReport, load_s1k, make_renderer, tokenize_dataset

log = logging.getLogger(__name__)

RESULTS_FILE = "train_results.json"
LOSS_LOG_FILE = "loss_log.jsonl"
STATE_FILE = "trainer_state.json"  # transformers' TrainerState: steps, batch size, the whole log


@dataclass
class TrainOutcome:
    output_dir: Path
    metrics: dict
    hyperparameters: dict
    overlong: OverlongReport
    is_main_process: bool  # rank 0 writes the files and speaks for the run


def use_bf16(config: TrainConfig) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def checkpointing_args(config_cls, enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers version uses (renamed in v5.2x)."""
    name = "activation_checkpointing" if "activation_checkpointing" in config_cls.__dataclass_fields__ else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def build_trainer(config: TrainConfig):
    """Everything up to the first step: data checked and tokenized, model loaded, SFTTrainer made.
    Every user error (paths, columns, template, batch arithmetic) is raised here, before training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from server.cli import resolve_model_dir

    model_dir = resolve_model_dir(config.model)
    data = load_s1k(config.dataset)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = make_renderer(tokenizer, config, data.column_names)
    train_set, overlong = tokenize_dataset(data, renderer, config)
    bf16 = use_bf16(config)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The server stops at EOS: make the end of an assistant turn one, or the trained model's
    # replies would run on past `<|im_end|>`.
    turn_end_ids = tokenizer.encode(renderer.turn_end, add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if len(turn_end_ids) == 1 and turn_end_ids[0] not in eos:
        model.generation_config.eos_token_id = eos + turn_end_ids

    args = SFTConfig(
        output_dir=config.output_dir,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.per_device_batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # below 1: a fraction of all steps
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # bf16 autocast on a CPU: transformers asks for it explicitly
        **checkpointing_args(SFTConfig, config.gradient_checkpointing),
        max_length=None,  # over-long samples were handled by our own policy above
        completion_only_loss=True,
        logging_steps=config.logging_steps,
        save_strategy="no",  # one final save below; s1's 315 steps do not need checkpoints
        report_to="none",
        seed=config.seed,
        dataset_num_proc=config.dataset_num_proc,
    )
    # The launcher decides the world size (transformers reads it from accelerate's state), so the
    # accumulation that keeps the global batch is set once the arguments know it.
    args.gradient_accumulation_steps = config.gradient_accumulation(args.world_size)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer)
    return trainer, overlong


def effective_hyperparameters(config: TrainConfig, trainer) -> dict:
    args, state = trainer.args, trainer.state
    return {
        **config.to_dict(),
        "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "max_steps": state.max_steps,
        "warmup_steps": args.get_warmup_steps(state.max_steps),
        "lr_scheduler": "linear warm-up, cosine to 0",
        "bf16": args.bf16,
        "num_samples": len(trainer.train_dataset),
    }


def train(config: TrainConfig) -> TrainOutcome:
    trainer, overlong = build_trainer(config)
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    output_dir = Path(config.output_dir)
    trainer.save_model(str(output_dir))  # weights (safetensors), config, generation config, tokenizer
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        **result.metrics,
        "wall_time_s": wall,
        "global_step": trainer.state.global_step,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "overlong_samples": asdict(overlong),
    }
    hyperparameters = effective_hyperparameters(config, trainer)
    is_main = trainer.is_world_process_zero()
    if is_main:
        (output_dir / RESULTS_FILE).write_text(json.dumps({"metrics": metrics, "hyperparameters": hyperparameters}, indent=2))
        trainer.state.save_to_json(str(output_dir / STATE_FILE))
        with open(output_dir / LOSS_LOG_FILE, "w") as f:
            for entry in trainer.state.log_history:
                f.write(json.dumps(entry) + "\n")
        log.info("trained %d steps in %.1f s; final loss %s; wrote %s", trainer.state.global_step, wall, metrics["final_loss"], output_dir)
    return TrainOutcome(output_dir, metrics, hyperparameters, overlong, is_main)
