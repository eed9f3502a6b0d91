"""A Lightning Fabric training script: the payload `fabric run` starts on every node.

Run it on a cluster (`fabric run --node-rank=R --main-address=IP --devices=D --num-nodes=N
trainer/train.py`) or alone (`python trainer/train.py`). Swap in your own model and data below;
keep the parts that make a cluster run safe: the DistributedSampler epochs, the all-reduced
metrics, the atomic checkpoints and the resume, the process-group timeout.

The default data is a seeded synthetic classification task (labels from a fixed "teacher"
network), so the loss visibly falls on CPU in under a minute. `--data` reads a torch file
{"x": float tensor [N, F], "y": int tensor [N]} from a local path or an s3:// URI instead, or
every such *.pt file of a folder: by default $FABRIC_DATA_DIR, where a deploy's `data` channel
lies on each node's disk (`make local ARGS="--data DIR"` locally).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric, seed_everything
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from torch import nn
from torch.distributed.distributed_c10d import _set_pg_timeout
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

CHECKPOINT_GLOB = "step-*.ckpt"
KEEP_CHECKPOINTS = 3
UNREADABLE_SUFFIX = ".unreadable"  # a torn or corrupt checkpoint, renamed out of the glob


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a classifier with Lightning Fabric.")
    parser.add_argument("--epochs", type=int, default=20)
    # 256 per process, not 64: each step has a fixed cost (Fabric's wrappers, the gradient
    # all-reduce, Python) that a small step pays again and again; see bench/results.md.
    parser.add_argument("--batch-size", type=int, default=256, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=256, help="width of the model's layers")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("FABRIC_RUN_DIR", "runs/latest"),
        help="checkpoints, metrics and the summary (default: $FABRIC_RUN_DIR or runs/latest)",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("FABRIC_DATA_DIR", ""),
        help="a torch file, a folder of them or an s3:// URI (default: $FABRIC_DATA_DIR, "
        "else synthetic data)",
    )
    parser.add_argument(
        "--show-env",
        action="append",
        default=[],
        metavar="NAME",
        help="print a variable as the script sees it (a secret's value is masked in the "
        "node's logs) and record its sha256 in the summary",
    )
    parser.add_argument("--samples", type=int, default=16384, help="synthetic samples")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every K steps (0: off)"
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="all-reduce and log the loss every N steps (each sync costs a step some time)",
    )
    parser.add_argument(
        "--pg-timeout", type=float, default=180.0, help="seconds before a collective gives up"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "samples", "log_every", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_every < 0 or args.pg_timeout <= 0:
        parser.error("--checkpoint-every must be >= 0 and --pg-timeout > 0")
    return args


class ResumableSampler(DistributedSampler):
    """A DistributedSampler whose epoch comes from the training loop only.

    Fabric's loader calls set_epoch with its own count of passes, which restarts at 0 when a
    run resumes; the shuffle of a resumed epoch must be that of the epoch itself.
    """

    def set_epoch(self, epoch: int) -> None:
        pass  # Fabric's call; see set_epoch_from_loop

    def set_epoch_from_loop(self, epoch: int) -> None:
        super().set_epoch(epoch)


def synthetic_data(samples: int, seed: int, features: int = 32, classes: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    teacher = nn.Sequential(nn.Linear(features, 64), nn.Tanh(), nn.Linear(64, classes))
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        y = teacher(x).argmax(dim=1)
    return TensorDataset(x, y)


def read_data(location: str) -> TensorDataset:
    """A torch file holding {"x": [N, F] floats, "y": [N] class ids}, or a folder of them (in
    name order, concatenated); SystemExit if unusable."""
    if Path(location).is_dir():
        files = sorted(Path(location).rglob("*.pt"))
        if not files:
            raise SystemExit(f"error: cannot read --data {location}: no *.pt file in it")
        parts = [read_data(str(file)).tensors for file in files]
        return TensorDataset(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    try:
        if location.startswith("s3://"):
            import boto3  # only needed for s3:// data

            bucket, _, key = location.removeprefix("s3://").partition("/")
            body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
            blob = torch.load(io.BytesIO(body), weights_only=True)
        else:
            blob = torch.load(location, weights_only=True)
        x, y = blob["x"].float(), blob["y"].long()
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError("expected x of shape [N, F] and y of shape [N], N > 0")
    except Exception as error:  # one clear line for a bad file, whatever the reason
        raise SystemExit(f"error: cannot read --data {location}: {error}") from None
    return TensorDataset(x, y)


def shown_env(names: list[str]) -> dict[str, str | None]:
    """Each variable's sha256 (None: not set): proof that the script read it, without it."""
    return {
        name: hashlib.sha256(os.environ[name].encode()).hexdigest() if name in os.environ else None
        for name in names
    }


def build_model(features: int, classes: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def newest_checkpoint(checkpoint_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; torn or corrupt files are skipped with a warning.

    A skipped file is set aside as `<name>.unreadable` (renamed, not deleted: it may be worth a
    look): left under its name it would stay the "newest" checkpoint, which pruning keeps
    forever and every later resume reads again. Call it on one rank only (it renames files).

    Loaded onto the CPU on purpose: it is then broadcast as a pickle, and a CUDA tensor in it
    would be unpickled onto rank 0's GPU on every rank. load_state_dict copies it to the device.
    """
    for path in sorted(checkpoint_dir.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
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
    """Written under a temporary name, renamed when complete: a reader never sees half a file."""
    final = checkpoint_dir / f"step-{state['step']:08d}.ckpt"
    partial = final.with_name(final.name + ".tmp")
    fabric.save(partial, state)
    fabric.barrier()
    if fabric.is_global_zero:
        os.replace(partial, final)
        for old in sorted(checkpoint_dir.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
            old.unlink()
    return final


class _ContinuedWriter(_ExperimentWriter):
    """Lightning's metrics.csv writer, continuing the file of the runs this one resumes.

    Lightning's writer deletes an existing metrics.csv when it starts (a fixed version is
    "overwritten"), so every resume would lose the rows of the runs before it. This one keeps
    the rows up to the step the run resumed from and appends after them; rows past that step
    were logged after the checkpoint and are dropped, as those steps are trained and logged again.
    """

    def __init__(self, log_dir: str, resumed_step: int) -> None:
        self.resumed_step = resumed_step
        super().__init__(log_dir)  # calls _check_log_dir_exists

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file (and warns so)
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            keys = sorted(reader.fieldnames or [])
            # A row with too few or too many fields (a torn append) has a None in it.
            rows = [row for row in reader if None not in row and None not in row.values()]
        rows = [row for row in rows if _csv_step(row) <= self.resumed_step]
        if not rows:
            path.unlink()  # as a fresh run: the header comes from what this run logs
            return
        # Lightning appends in the order of its sorted metrics_keys: write the header so.
        partial = path.with_name(path.name + ".tmp")
        with partial.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)  # a reader never sees half a file
        # save() appends under these columns, and rewrites the file when a new one comes.
        self.metrics_keys = keys


def _csv_step(row: dict[str, str]) -> float:
    """A row's step; a row without a readable one counts as past any checkpoint (dropped)."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return float("inf")


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives resumes: see _ContinuedWriter."""

    def __init__(self, *args: Any, resumed_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_step = resumed_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resumed_step)
        return self._experiment


def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # The raw bytes: numpy has no bfloat16 (bf16-true weights), and a byte view needs no copy.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_progress(run_dir: Path, values: dict[str, Any]) -> None:
    """progress.json: what `make status` shows while the run trains (rank 0 only). Replaced
    in one rename, so a reader never sees half of it."""
    progress = {**values, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    partial = run_dir / "progress.json.tmp"
    partial.write_text(json.dumps(progress) + "\n")
    partial.replace(run_dir / "progress.json")


def plot_loss(history: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([step for step, _ in history], [loss for _, loss in history])
    axes.set(xlabel="step", ylabel="training loss (mean over all ranks)", title="Loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGUSR1 asks for a clean stop (the node agent sends it on a spot interruption notice).
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGUSR1, request_stop)
    fabric = Fabric()  # accelerator, devices and nodes come from `fabric run`
    if not fabric._launched:  # plain `python train.py`; under `fabric run` it is launched already
        fabric.launch()
    if torch.distributed.is_initialized():
        # A dead peer then fails the others within this time instead of 30 minutes.
        _set_pg_timeout(timedelta(seconds=args.pg_timeout))
    seed_everything(args.seed)
    run_dir = Path(args.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    if fabric.is_global_zero:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    dataset = read_data(args.data) if args.data else synthetic_data(args.samples, args.seed)
    for name in args.show_env:  # as a careless script would: the node masks a secret's value
        fabric.print(f"env {name}={os.environ.get(name, '(not set)')}")
    features, classes = dataset.tensors[0].shape[1], int(dataset.tensors[1].max()) + 1
    model = build_model(features, classes, args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    # Each rank reads its own shard, reshuffled every epoch by set_epoch; the same in a
    # single process, so one seed gives the same batches on 1 or N processes.
    sampler = ResumableSampler(
        dataset,
        num_replicas=fabric.world_size,
        rank=fabric.global_rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    loader = fabric.setup_dataloaders(
        DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True),
        use_distributed_sampler=False,
    )
    steps_per_epoch = len(loader)

    def last_batch(batch_index: int) -> bool:
        return batch_index == steps_per_epoch - 1

    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0, "history": []}

    # Only global rank 0's node holds the checkpoints: it reads, everyone gets a copy.
    found = newest_checkpoint(checkpoint_dir) if fabric.is_global_zero else None
    found = fabric.broadcast(found, src=0)
    if found:
        path, checkpoint = found
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as error:  # another model shape, e.g. --hidden
            first_line = str(error).strip().splitlines()[0]
            raise SystemExit(
                f"error: checkpoint {path} does not fit this model ({first_line}); "
                "resume with the options it was trained with, or use another --run-dir"
            ) from None
        state["step"], state["history"] = checkpoint["step"], checkpoint["history"]
        fabric.print(f"resumed from {path} at step {state['step']}")
    # The summary names the checkpoint this run saved last, not the newest name in the folder:
    # a file this run did not write (torn, or from another run) can sort after it.
    last_saved: Path | None = found[0] if found else None

    # torchrun (under fabric run) says how many processes this node runs.
    devices_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", fabric.world_size))
    num_nodes = fabric.world_size // devices_per_node
    logger = ContinuedCSVLogger(
        root_dir=str(run_dir), name="metrics", version=0, resumed_step=state["step"]
    )
    if fabric.is_global_zero:
        # Trims metrics.csv to the resumed step now, not at the first log (an epoch away).
        logger.experiment.save()
    total_steps = args.epochs * steps_per_epoch
    samples_per_step = args.batch_size * fabric.world_size
    fabric.print(
        f"training: world size {fabric.world_size} ({devices_per_node} device(s) x "
        f"{num_nodes} node(s)), {steps_per_epoch} steps per epoch, "
        f"{args.epochs} epochs, run dir {run_dir}"
    )
    started, trained_steps, step_seconds = time.perf_counter(), 0, 0.0
    progress_written = 0.0  # when progress.json was written last (time.perf_counter)
    first_epoch = state["step"] // steps_per_epoch
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch_from_loop(epoch)
        skip = state["step"] - epoch * steps_per_epoch  # batches done before a mid-epoch resume
        model.train()
        # Every tensor made here lives on fabric.device: a CPU tensor beside a CUDA loss raises
        # "Expected all tensors to be on the same device", and NCCL reduces CUDA tensors only.
        epoch_loss = torch.zeros((), device=fabric.device)
        epoch_correct = torch.zeros((), device=fabric.device)
        epoch_seen = 0
        bar = tqdm(
            total=steps_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not fabric.is_global_zero,
            mininterval=1.0,
            file=sys.stdout,
        )
        epoch_started, stop_now = time.perf_counter(), False
        for batch_index, (x, y) in enumerate(loader):
            if batch_index < skip:
                continue
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            state["step"] += 1
            trained_steps += 1
            if trained_steps == 1:  # time to first step, for the benchmarks and the logs
                stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
                fabric.print(f"{stamp} first step done (step {state['step']})")
            # In place: no new tensors per step for the epoch metrics.
            epoch_loss.add_(loss.detach(), alpha=len(y))
            epoch_correct.add_((logits.argmax(dim=1) == y).sum())
            epoch_seen += len(y)
            if trained_steps == 1 or state["step"] % args.log_every == 0 or last_batch(batch_index):
                # The loss for the log, and whether any rank was asked to stop (spot notice):
                # one small all-reduce every log_every steps, at the same steps on every rank.
                flag = torch.tensor(float(stop_requested), device=fabric.device)
                synced = fabric.all_reduce(torch.stack([loss.detach(), flag]), reduce_op="mean")
                global_loss, stop_now = synced[0].item(), synced[1].item() > 0
                state["history"].append([state["step"], global_loss])
                rate = (
                    (batch_index + 1 - skip)
                    * samples_per_step
                    / (time.perf_counter() - epoch_started)
                )
                # No redraw here (it costs more than a step): tqdm redraws every mininterval.
                bar.set_postfix(
                    loss=f"{global_loss:.4f}", samples_per_s=f"{rate:.0f}", refresh=False
                )
                if fabric.is_global_zero and time.perf_counter() - progress_written >= 15:
                    progress_written = time.perf_counter()
                    progress = {"step": state["step"], "total_steps": total_steps}
                    progress |= {"loss": global_loss, "samples_per_s": rate}
                    write_progress(run_dir, progress)
            bar.update()
            if args.checkpoint_every and state["step"] % args.checkpoint_every == 0:
                last_saved = save_checkpoint(fabric, checkpoint_dir, state)
            if stop_now:  # every rank saw the same value: all stop at this step
                bar.close()
                path = save_checkpoint(fabric, checkpoint_dir, state)
                fabric.print(
                    f"stopping on request at step {state['step']}: saved {path}; "
                    "the next run resumes from it"
                )
                return
        bar.close()
        step_seconds += time.perf_counter() - epoch_started  # epoch-end work is counted apart
        seen = torch.tensor(float(epoch_seen), device=fabric.device)
        totals = fabric.all_reduce(torch.stack([epoch_loss, epoch_correct, seen]), reduce_op="sum")
        loss_value = (totals[0] / totals[2]).item() if totals[2] > 0 else float("nan")
        accuracy = (totals[1] / totals[2]).item() if totals[2] > 0 else float("nan")
        fabric.print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_value:.4f}, "
            f"accuracy {accuracy:.3f}, step {state['step']}/{total_steps}"
        )
        if fabric.is_global_zero:
            logger.log_metrics(
                {"epoch": epoch + 1, "loss": loss_value, "accuracy": accuracy}, step=state["step"]
            )
            logger.save()
        last_saved = save_checkpoint(fabric, checkpoint_dir, state)

    wall_time = time.perf_counter() - started
    if fabric.is_global_zero:
        history = state["history"]
        plot_path = run_dir / "loss.png"
        plot_loss(history, plot_path)
        summary = {
            "world_size": fabric.world_size,
            "num_nodes": num_nodes,
            "devices_per_node": devices_per_node,
            "device": str(fabric.device),
            "precision": fabric.strategy.precision.precision,
            "epochs": args.epochs,
            "steps": state["step"],
            "steps_this_run": trained_steps,
            "first_loss": history[0][1] if history else None,
            "final_loss": history[-1][1] if history else None,
            "samples_per_s": trained_steps * samples_per_step / wall_time if trained_steps else 0.0,
            "wall_time_s": wall_time,
            "step_time_ms": 1000 * step_seconds / trained_steps if trained_steps else 0.0,
            # The all-reduce, CSV log and checkpoint at the end of every epoch.
            "epoch_end_s": wall_time - step_seconds,
            "weights_sha256": weights_sha256(model),
            "data": args.data or "synthetic",
            "samples": len(dataset),
            "env_sha256": shown_env(args.show_env),
            "checkpoint": str(last_saved) if last_saved else None,
            "metrics": str(Path(logger.log_dir) / "metrics.csv"),
            "plot": str(plot_path),
        }
        write_progress(
            run_dir,
            {
                "step": state["step"],
                "total_steps": total_steps,
                "loss": summary["final_loss"],
                "samples_per_s": summary["samples_per_s"],
            },
        )
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        fabric.print("summary: " + json.dumps(summary))


if __name__ == "__main__":
    main()
