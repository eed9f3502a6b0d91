"""Train a small character-level language model on a text file with Lightning Fabric.

    fabric run --accelerator cpu --devices 2 train.py --max-steps 50

Run from this folder: the text is read from a relative path (data/shakespeare.txt) and the
outputs go to --run-dir ($FABRIC_RUN_DIR, else runs/latest): checkpoints/step-XXXXXXXX.ckpt
(the newest few), progress.json while it trains, summary.json at the end. A run started again
with the same --run-dir resumes from the newest readable checkpoint and continues exactly as
the interrupted run would have (each step's batch depends only on seed, step and rank).

SIGTERM or SIGUSR1 asks for a clean stop: every rank stops at the same step (the next
loss sync, at most --log-every steps later), a checkpoint is saved, and the script exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from data import CharText, get_batch, read_text
from lightning.fabric import Fabric, seed_everything
from model import CharGPT, GPTConfig, generate, loss_fn

CHECKPOINT_GLOB = "step-*.ckpt"
KEEP_CHECKPOINTS = 3
UNREADABLE_SUFFIX = ".unreadable"  # a torn or corrupt checkpoint, renamed out of the glob
PROGRESS_EVERY_S = 15.0
EVAL_BATCHES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per process")
    parser.add_argument("--block-size", type=int, default=64, help="characters per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data", default="data/shakespeare.txt", help="a UTF-8 text file")
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("FABRIC_RUN_DIR", "runs/latest"),
        help="checkpoints, progress.json and summary.json (default: $FABRIC_RUN_DIR or "
        "runs/latest)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="0: only at the end")
    parser.add_argument("--log-every", type=int, default=10, help="sync and log the loss")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--sample-chars", type=int, default=200, help="length of the sample")
    parser.add_argument("--prompt", default="\n", help="the sample's first characters")
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "block_size", "log_every", "n_layer", "n_head"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_every < 0 or args.warmup_steps < 0 or args.sample_chars < 0:
        parser.error("--checkpoint-every, --warmup-steps and --sample-chars must be >= 0")
    if args.lr <= 0 or not args.prompt:
        parser.error("--lr must be > 0 and --prompt not empty")
    if args.n_embd % args.n_head:
        parser.error("--n-embd must be a multiple of --n-head")
    return args


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak: a function of the step alone."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    span = max(1, args.max_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def log(fabric: Fabric, message: str) -> None:
    """One line from global rank 0 only (fabric.print prints once per node)."""
    if fabric.is_global_zero:
        print(message, flush=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def newest_checkpoint(checkpoint_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a torn or corrupt one is set aside with a warning.

    Set aside (renamed to `<name>.unreadable`), not left in place: it would stay the "newest"
    one, which the pruning keeps and every later resume reads again. Call it on rank 0 only.
    Loaded onto the CPU: it is broadcast as a pickle, and a CUDA tensor in it would land on
    rank 0's GPU in every process; load_state_dict copies it to each rank's device.
    """
    for path in sorted(checkpoint_dir.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if not {"model", "optimizer", "step", "config"} <= checkpoint.keys():
                raise ValueError("not a charlm checkpoint (keys missing)")
            return path, checkpoint
        except Exception as error:  # any reason at all: try the next older one
            aside = path.with_name(path.name + UNREADABLE_SUFFIX)
            try:
                os.replace(path, aside)
                outcome = f"set aside as {aside.name}"
            except OSError as rename_error:
                outcome = f"could not set it aside: {rename_error}"
            print(
                f"warning: skipping unreadable checkpoint {path}: {error}; {outcome}",
                file=sys.stderr,
            )
    return None


def save_checkpoint(fabric: Fabric, checkpoint_dir: Path, state: dict[str, Any]) -> Path:
    """Written as `*.tmp` and renamed by rank 0 once every rank is done: never half a file."""
    final = checkpoint_dir / f"step-{state['step']:08d}.ckpt"
    partial = final.with_name(final.name + ".tmp")
    fabric.save(partial, state)
    fabric.barrier()
    if fabric.is_global_zero:
        os.replace(partial, final)
        for old in sorted(checkpoint_dir.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
    return final


def run_config(text: CharText, config: GPTConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's shape and the vocabulary."""
    return {**config.to_dict(), "chars": text.chars}


@torch.no_grad()
def evaluate(
    fabric: Fabric, model: torch.nn.Module, text: CharText, args: argparse.Namespace
) -> float:
    """Mean validation loss over a few fixed batches per rank, averaged over all ranks."""
    model.eval()
    total = torch.zeros((), device=fabric.device)
    for i in range(EVAL_BATCHES):
        x, y = get_batch(
            text.val, args.batch_size, args.block_size,
            seed=args.seed, step=i, rank=fabric.global_rank, split="val",
        )  # fmt: skip
        total += loss_fn(model(x), y)
    model.train()
    return fabric.all_reduce(total / EVAL_BATCHES, reduce_op="mean").item()


def sample_text(
    fabric: Fabric, model: torch.nn.Module, text: CharText, args: argparse.Namespace
) -> str:
    """A short text in the model's style. Every rank samples (a wrapped model's forward may
    need all of them); the generator, and so the text, is the same on each."""
    prompt = torch.tensor([text.encode(args.prompt)], dtype=torch.long, device=fabric.device)
    generator = torch.Generator(device=fabric.device).manual_seed(args.seed)
    model.eval()
    ids = generate(model, prompt, args.sample_chars, args.block_size, generator=generator)
    model.train()
    return text.decode(ids[0].tolist())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        if not stop_requested:
            print(f"signal {signum}: stopping at the next sync", file=sys.stderr, flush=True)
        stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)

    # Accelerator, devices, nodes and precision come from `fabric run` (its environment).
    fabric = Fabric()
    if not int(os.environ.get("LT_CLI_USED", "0")):
        fabric.launch()  # plain `python train.py`; under `fabric run` launch() would raise
    if "OMP_NUM_THREADS" not in os.environ and fabric.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    seed_everything(args.seed, verbose=False)

    run_dir = Path(args.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if fabric.is_global_zero:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir.glob("*.tmp"):  # a save that a crash cut short
            stale.unlink(missing_ok=True)

    text = read_text(args.data, fabric.device)
    config = GPTConfig(
        vocab_size=text.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = CharGPT(config)
    parameters = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)

    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "step": 0,
        "loss": None,
        "config": run_config(text, config),
    }
    # Only global rank 0's node holds the checkpoints (fabric.save writes there): it reads,
    # and every rank gets a copy.
    found = newest_checkpoint(checkpoint_dir) if fabric.is_global_zero else None
    found = fabric.broadcast(found, src=0)
    last_saved: Path | None = None
    if found:
        path, checkpoint = found
        if checkpoint["config"] != state["config"]:
            differences = ", ".join(
                f"{key} {checkpoint['config'].get(key)!r} (now {value!r})"
                for key, value in state["config"].items()
                if checkpoint["config"].get(key) != value
            )
            message = (
                f"error: checkpoint {path} does not fit this model or text: {differences}; "
                "resume with the options it was trained with, or use another --run-dir"
            )
            raise SystemExit(message if fabric.is_global_zero else 1)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state["step"], state["loss"] = checkpoint["step"], checkpoint["loss"]
        last_saved = path
        log(fabric, f"resumed from step {state['step']} ({path})")
    start_step = state["step"]

    devices_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", fabric.world_size))
    num_nodes = max(1, fabric.world_size // devices_per_node)
    samples_per_step = args.batch_size * fabric.world_size
    log(
        fabric,
        f"training: world size {fabric.world_size} ({num_nodes} node(s) x {devices_per_node} "
        f"device(s)) on {fabric.device}, {parameters:,} parameters, vocabulary "
        f"{text.vocab_size}, steps {start_step}..{args.max_steps}, run dir {run_dir}",
    )

    def progress(loss: float | None, rate: float) -> None:
        write_json(
            run_dir / "progress.json",
            {
                "step": state["step"],
                "total_steps": args.max_steps,
                "loss": loss,
                "samples_per_s": rate,
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    model.train()
    first_loss: float | None = None
    rate = 0.0
    last_progress = -math.inf
    started = time.perf_counter()
    stopped_early = False
    while state["step"] < args.max_steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = get_batch(
            text.train, args.batch_size, args.block_size,
            seed=args.seed, step=step, rank=fabric.global_rank,
        )  # fmt: skip
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        state["step"] = step + 1
        trained = state["step"] - start_step

        if trained == 1 or state["step"] % args.log_every == 0 or state["step"] == args.max_steps:
            # The same steps on every rank: the mean loss, and whether any rank was asked to
            # stop, in one small all-reduce (a sync costs a step some time: not every step).
            flag = torch.tensor(float(stop_requested), device=fabric.device)
            synced = fabric.all_reduce(torch.stack([loss.detach().float(), flag]), reduce_op="mean")
            state["loss"] = synced[0].item()
            stop_now = synced[1].item() > 0
            first_loss = state["loss"] if first_loss is None else first_loss
            rate = trained * samples_per_step / (time.perf_counter() - started)
            log(
                fabric,
                f"step {state['step']}/{args.max_steps}: loss {state['loss']:.4f}, "
                f"lr {learning_rate(step, args):.2e}, {rate:.0f} samples/s",
            )
            if fabric.is_global_zero and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                progress(state["loss"], rate)
                last_progress = time.monotonic()
            if stop_now and state["step"] < args.max_steps:
                last_saved = save_checkpoint(fabric, checkpoint_dir, state)
                log(fabric, f"stopping on request at step {state['step']}: saved {last_saved}")
                stopped_early = True
                break

        if args.checkpoint_every and state["step"] % args.checkpoint_every == 0:
            last_saved = save_checkpoint(fabric, checkpoint_dir, state)

    train_time = time.perf_counter() - started
    trained = state["step"] - start_step
    if trained and (last_saved is None or last_saved.name != f"step-{state['step']:08d}.ckpt"):
        last_saved = save_checkpoint(fabric, checkpoint_dir, state)  # always one at the end
    rate = trained * samples_per_step / train_time if trained else 0.0
    if fabric.is_global_zero:
        progress(state["loss"], rate)
    if stopped_early:
        return  # the next run resumes from the checkpoint; no summary for an unfinished run

    val_loss = evaluate(fabric, model, text, args)
    sample = sample_text(fabric, model, text, args) if args.sample_chars else ""
    log(fabric, f"validation loss {val_loss:.4f}" + (f"; sample:\n{sample}" if sample else ""))
    if fabric.is_global_zero:
        summary = {
            "world_size": fabric.world_size,
            "num_nodes": num_nodes,
            "devices_per_node": devices_per_node,
            "device": str(fabric.device),
            "precision": fabric.strategy.precision.precision,
            "parameters": parameters,
            "vocab_size": text.vocab_size,
            "steps": state["step"],
            "steps_this_run": trained,
            "resumed_from_step": start_step if found else None,
            "first_loss": first_loss,
            "final_loss": state["loss"],
            "val_loss": val_loss,
            "samples_per_s": rate,
            "tokens_per_s": rate * args.block_size,
            "train_time_s": train_time,
            "checkpoint": str(last_saved) if last_saved else None,
            "sample": sample,
        }
        write_json(run_dir / "summary.json", summary)
        log(fabric, "summary: " + json.dumps({k: v for k, v in summary.items() if k != "sample"}))


if __name__ == "__main__":
    main()
