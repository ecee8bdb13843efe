"""The one training loop: single process by default, distributed under `accelerate launch`."""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from accelerate.utils import gather_object, is_tensorboard_available, set_seed
from safetensors.torch import load_file
from torch.distributed.fsdp import MixedPrecisionPolicy
from tqdm.auto import tqdm

from ..checkpoint import (EMA_WEIGHTS_FILE, LATEST_FILE, WEIGHTS_FILE, CheckpointError, atomic_write_text,
                          resolve_checkpoint)
from ..config import ConfigError
from ..data.epochs import Position, StreamStart
from ..data.loader import make_image_loader
from ..data.token_loader import check_token_shards, make_token_loader, token_shards_info
from ..modeling import TesseraModel
from ..nn.attention import auto_summary
from ..registry import build_model
from .ddp import bf16_all_reduce, ddp_kwargs
from .deepspeed_state import Zero3Layout, keep_frozen_whole, load_optimizer_partition, write_optimizer_partition
from .ema import EMA
from .fsdp_state import FsdpLayout, load_optimizer_shards, write_optimizer_shards
from .partitions import move_optimizer_partitions, saved_worlds
from .previews import write_preview
from .recipe import Recipe
from .schedule import warmup_cosine
from .step_guard import ClosedMeans, LoggedMeans, NonFiniteSteps, arm_skip, finite_flag, plain_norm
from .stop import StopRequest
from .throughput import MeteredWindow, ThroughputMeter, peak_flops, training_flops_per_sample
from .state import load_train_state, rng_state, save_training_checkpoint, set_rng_state

TEXT_TOKENIZER_AUTO = "auto"
LOG_FILE = "log.jsonl"  # one JSON line per log_every steps


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def _prepare_assets(recipe: Recipe, run_dir: Path, is_main: bool) -> dict[str, Any]:
    """Model config with `text_tokenizer: auto` replaced by one trained on the shards' captions."""
    config = dict(recipe.model.config)
    if config.get("text_tokenizer") == TEXT_TOKENIZER_AUTO:
        from ..data.loader import iter_captions
        from ..tokenizers.text import train_text_tokenizer
        path = run_dir / "text_tokenizer.json"
        if is_main and not path.exists():
            train_text_tokenizer(iter_captions(recipe.data.shards), vocab_size=1024, out_path=path)
        config["text_tokenizer"] = str(path)
    return config


def _loader(recipe: Recipe, model: TesseraModel, start: StreamStart | None, tokens: bool):
    """Infinite training batches of the model's modality from `data.shards` (token arrays when `tokens`),
    resuming at `start`."""
    data, batch_size, seed = recipe.data, recipe.train.batch_size, recipe.train.seed
    if model.modality == "audio":
        from ..data.audio_loader import make_audio_loader
        return make_audio_loader(data.shards, batch_size, model.sample_rate, data.clip_seconds or model.clip_seconds,
                                 num_workers=data.num_workers, seed=seed, shuffle_buffer=data.shuffle_buffer,
                                 start=start)
    if tokens:
        return make_token_loader(data.shards, batch_size, num_workers=data.num_workers, seed=seed,
                                 shuffle_buffer=data.shuffle_buffer, start=start)
    resolution = data.resolution or getattr(model.config, "image_size", 0)
    return make_image_loader(data.shards, batch_size, resolution, num_workers=data.num_workers, seed=seed,
                             shuffle_buffer=data.shuffle_buffer, start=start)


def _batch_size(batch: dict[str, Any]) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


def _optimizer(model: TesseraModel, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases or gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = recipe.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), fused=True)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """The Accelerator for this launch: gloo on CPU-only multi-process runs, and DeepSpeed's
    "auto" batch, accumulation and clipping fields filled from the recipe (its JSON holds bf16);
    a DeepSpeed config without ZeRO, or one that would apply non-finite updates, is refused."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if world > 1 and importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed")  # before the process group exists: a late import can abort at exit
    precision = None if deepspeed else _mixed_precision(t.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, fsdp_plugin=_fsdp_plugin(precision),
                              gradient_accumulation_steps=t.grad_accum,
                              kwargs_handlers=[ddp_kwargs(t), *([InitProcessGroupKwargs(backend="gloo")]
                                                                 if world > 1 and not torch.cuda.is_available() else [])],
                              log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(run_dir))
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise ConfigError(f"{world} processes were launched but accelerate chose no distributed mode, so they would "
                          "train unsynchronised copies (FSDP needs GPUs; on a CPU use the DDP or DeepSpeed recipes "
                          "in docs/training_at_scale.md)")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if plugin.zero_stage not in (1, 2, 3):
            raise ConfigError(f"the DeepSpeed config sets zero_optimization.stage={plugin.zero_stage}; tessera trains "
                              "under ZeRO-1/2/3, whose optimizer partitions it checkpoints")
        if plugin.deepspeed_config.get("bf16", {}).get("check_grad_overflow") is False:
            raise ConfigError("the DeepSpeed config sets bf16.check_grad_overflow=false, so ZeRO would apply updates "
                              "whose gradients are not finite; tessera skips those: remove the key")
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                                       train_batch_size=t.batch_size * t.grad_accum * accelerator.num_processes,
                                       gradient_clipping=t.grad_clip)
    return accelerator


def _fsdp_plugin(precision: str | None) -> FullyShardedDataParallelPlugin | None:
    """Under an FSDP launch in bf16/fp16: compute in that dtype but reduce gradients in float32, as DDP
    under autocast does, and leave outputs uncast, so the loss stays float32 (accelerate's default reduces
    in the low dtype and casts every shard unit's output, the loss too). The rest of the plugin comes
    from the launch config."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or precision in (None, "no"):
        return None
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the FSDP launch config sets fsdp_version 1; tessera trains under FSDP2 "
                          "(fsdp_version: 2, as launch/accelerate/fsdp.yaml)")
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=low,
                                                                                      reduce_dtype=torch.float32))


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the recipe's model; returns the final metrics (also written to `out/metrics.json`)."""
    process_group: list[object] = []
    metrics = _train(recipe, resume, progress, process_group)
    # The process group must die here, after the DDP wrapper: dropped last by DDP's reducer, its gloo
    # destructor joins the worker threads while holding the GIL, which a worker freeing a finished
    # collective waits for, and the process never exits. Python's reference releases the GIL first.
    gc.collect()
    process_group.clear()
    return metrics


def _train(recipe: Recipe, resume: bool, progress: bool, process_group: list[object]) -> dict[str, Any]:
    """`train`, holding the default process group in `process_group` once the launch made one."""
    if not recipe.data.shards:
        raise ConfigError("data.shards is empty: point it at a folder of shards (e.g. made by `tessera data shapes`)")
    run_dir = Path(recipe.out)
    latest = run_dir / "checkpoints" / LATEST_FILE
    if latest.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or set out= elsewhere")
    t = recipe.train
    accelerator = _accelerator(recipe, run_dir)
    if torch.distributed.is_initialized():
        process_group.append(torch.distributed.group.WORLD)
    if not is_tensorboard_available():
        accelerator.print("note: tensorboard is not installed (pip install 'tessera[train]'); logging to metrics.json only")
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    model_config = _prepare_assets(recipe, run_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(t.seed)  # every rank builds the same initial weights (FSDP shards them as they are)
    model = build_model(recipe.model.kind, recipe.model.preset or None, **model_config)
    set_seed(t.seed + accelerator.process_index)
    tokens = token_shards_info(recipe.data.shards) is not None
    if tokens:
        if getattr(model, "tokenizer", None) is None:
            raise ConfigError(f"{recipe.data.shards} holds pre-tokenized shards; {recipe.model.kind} trains on raw data")
        check_token_shards(recipe.data.shards, model.tokenizer)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    zero3 = deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    _configure_trunk(model, recipe, zero3)
    if zero3:
        keep_frozen_whole(model, accelerator.device)
    optimizer = _optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    ema = EMA(model, t.ema_decay)
    step, start = 0, None
    ckpt = resolve_checkpoint(run_dir) if resume and latest.exists() else None
    if ckpt is not None and not (deepspeed or fsdp) and saved_worlds(ckpt):
        raise CheckpointError(f"{ckpt} holds per-rank optimizer partitions (saved under DeepSpeed or FSDP); "
                              "resume it with the launch config it was saved with")
    if ckpt is not None:
        step, start = _restore(ckpt, model, ema, optimizer, scheduler, accelerator.process_index,
                               accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    if t.ddp_bf16_gradients and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(None, bf16_all_reduce)
    elif t.ddp_bf16_gradients and accelerator.num_processes > 1:
        warnings.warn(f"train.ddp_bf16_gradients applies to DDP launches; under {accelerator.distributed_type.value} "
                      "gradients are reduced as its config says", RuntimeWarning, stacklevel=2)
    partitions = _optimizer_partitions(accelerator, model, optimizer)
    if ckpt is not None and partitions is not None and not partitions[1](ckpt):
        warnings.warn(f"{ckpt} holds no per-rank optimizer partitions (saved without DeepSpeed or FSDP, or by an "
                      "older tessera): the optimizer moments start afresh", RuntimeWarning, stacklevel=2)
    raw_model: TesseraModel = accelerator.unwrap_model(model)
    layout = Zero3Layout(raw_model) if zero3 else FsdpLayout(raw_model) if fsdp else None
    ema.shadow = {k: v.to(accelerator.device) for k, v in (layout.shard(ema.shadow) if layout else ema.shadow).items()}
    loader = _loader(recipe, raw_model, start, tokens)
    if accelerator.is_main_process:
        accelerator.init_trackers("logs", config={"kind": recipe.model.kind, "params": _count(raw_model)})
        attention = getattr(getattr(raw_model.config, "trunk", None), "attention", "n/a")
        if attention == "auto":
            attention += f" ({auto_summary(accelerator.device.type)})"
        accelerator.print(f"training {recipe.model.kind}: {_count(raw_model) / 1e6:.2f}M trainable params, "
                          f"attention={attention}, {_loss_path(raw_model)}"
                          f"precision={accelerator.mixed_precision}, device={accelerator.device}")
    with _batches(loader) as data:
        metrics = _loop(recipe, accelerator, model, raw_model, optimizer, scheduler, ema, data, step, run_dir,
                        progress, layout, partitions[0] if partitions else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _configure_trunk(model: TesseraModel, recipe: Recipe, zero3: bool) -> None:
    """Activation checkpointing and torch.compile of the generator's trunk, when the recipe asks
    (not torch.compile under ZeRO-3)."""
    t, trunk = recipe.train, getattr(model, "trunk", None)
    if not (t.activation_checkpointing or t.compile):
        return
    if t.compile and zero3:
        raise ConfigError("train.compile=true under DeepSpeed ZeRO-3: the compiled blocks would read ZeRO-3's "
                          "parameter shards before they are gathered (an illegal memory access on a GPU); set "
                          "train.compile=false, or launch ZeRO-2 or FSDP2, which compile")
    if trunk is None:
        raise ConfigError(f"train.activation_checkpointing and train.compile apply to a generator's trunk; "
                          f"{recipe.model.kind} has none")
    trunk.activation_checkpointing = t.activation_checkpointing
    if t.compile:
        # in place: parameter names unchanged
        trunk.compile(**compile_arguments(t.compile_mode, t.compile_tuning, t.compile_pdl))


def compile_arguments(mode: str, tuning: bool, pdl: bool = False) -> dict[str, Any]:
    """torch.compile's arguments for `mode`, with Inductor's coordinate-descent tuning added if `tuning`
    and programmatic dependent launch if `pdl` (torch.compile takes a mode or options, not both: the
    mode's options are spelled out)."""
    if not (tuning or pdl):
        return {"mode": mode}
    from torch._inductor import list_mode_options
    options = dict(list_mode_options(mode))
    if tuning:
        options["coordinate_descent_tuning"] = True
    if pdl:
        options["triton.enable_pdl"] = True
    return {"options": options}


def _restore(ckpt: Path, model: TesseraModel, ema: EMA, optimizer, scheduler, rank: int,
             world: int) -> tuple[int, StreamStart | None]:
    """Load a training checkpoint into the objects (this rank's RNG state when it was saved with
    as many ranks); returns its step and the data stream's position."""
    state = load_train_state(ckpt)
    model.load_trainable_state(load_file(str(ckpt / WEIGHTS_FILE)), source=ckpt / WEIGHTS_FILE)
    ema.load_state_dict(load_file(str(ckpt / EMA_WEIGHTS_FILE)), state["ema_updates"])
    if state["optimizer"] is not None:  # None: saved under DeepSpeed or FSDP, one optimizer partition per rank
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank (older: rank 0's)
    set_rng_state(states[rank] if len(states) == world else states[0])
    data = state.get("data")
    start = StreamStart(data["slots"], {int(k): tuple(v) for k, v in data["positions"].items()}) if data else None
    return int(state["step"]), start


def _data_position(accelerator: Accelerator, positions: dict[int, Position], slots: int) -> dict[str, Any]:
    """The stream positions of every loader slot of every rank (a collective call)."""
    merged: dict[int, Position] = {}
    for part in gather_object([positions]):
        merged.update(part)
    return {"slots": slots, "positions": {str(k): list(v) for k, v in merged.items()}}


def _optimizer_partitions(accelerator: Accelerator, model, optimizer
                          ) -> tuple[Callable[[Path], None], Callable[[Path], bool]] | None:
    """Under DeepSpeed and FSDP each rank keeps its own share of the optimizer state: (write it into a
    folder, load it from a checkpoint, False when that holds none); None when the state is saved whole."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return partial(write_optimizer_partition, model), partial(load_optimizer_partition, model)
    if accelerator.distributed_type == DistributedType.FSDP:
        return partial(write_optimizer_shards, optimizer), partial(load_optimizer_shards, optimizer)
    return None


def _loss_path(model: TesseraModel) -> str:
    """The cross-entropy path of a token-classifying generator, for the start-up line ("" otherwise)."""
    chunk = getattr(model.config, "loss_chunk", None)
    if chunk is None:
        return ""
    return f"loss=fused ({model.config.loss_kernel}, {chunk} rows), " if chunk else "loss=full logits, "


def _count(model: TesseraModel) -> int:
    """Trainable parameters (their full size under ZeRO-3, where each rank holds a shard)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def _throughput_meter(model: TesseraModel, accelerator: Accelerator) -> ThroughputMeter:
    """Throughput, model FLOPs utilisation (against the GPU's stated bf16 peak) and peak memory;
    tokenizers, which have no trunk, report samples/s only."""
    try:
        flops = training_flops_per_sample(model)
    except ValueError:
        flops = 0.0
    peak, gpu = peak_flops(accelerator.device)
    if flops and accelerator.is_main_process:
        stated = f"MFU against the {peak / 1e12:.0f} TFLOP/s bf16 peak of {gpu}" if peak else \
            f"no MFU: no known bf16 peak for {gpu} (set TESSERA_PEAK_TFLOPS)"
        accelerator.print(f"model FLOPs: {flops / 1e9:.2f} GFLOP per training sample; {stated}")
    return ThroughputMeter(flops, peak, accelerator.num_processes,
                           getattr(model, "tokens_per_sample", 0) or None, accelerator.device)


@contextmanager
def _batches(loader: Iterable[dict[str, Any]]) -> Iterator[Iterator[dict[str, Any]]]:
    """The loader's batches; on leaving, even by an exception, its worker processes are stopped at
    once (an exception's traceback would keep the iterator alive, and the exiting interpreter would
    then wait on the workers for ever)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what DataLoader's iterator runs when collected
        if shutdown is not None:
            shutdown()


@dataclass
class LoggedWindow:
    """A closed logging window: the step that closed it, the learning rate then, its means and rates."""

    step: int
    lr: float
    means: ClosedMeans
    rates: MeteredWindow


def _write_log(logged: LoggedWindow, accelerator: Accelerator, run_dir: Path, bar: tqdm) -> dict[str, Any]:
    """Log a closed window (TensorBoard, `log.jsonl`, the progress bar); its metrics, or {} when every
    step in it was skipped."""
    means = logged.means.means()
    if not means:
        return {}
    metrics = {**means, "lr": logged.lr, **logged.rates.rates()}
    accelerator.log(metrics, step=logged.step)
    if accelerator.is_main_process:
        with open(run_dir / LOG_FILE, "a") as log:
            log.write(json.dumps({"step": logged.step, **metrics}) + "\n")
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
    return metrics


def _loop(recipe, accelerator, model, raw_model, optimizer, scheduler, ema, data, step, run_dir, progress,
          layout: Zero3Layout | FsdpLayout | None, write_partition: Callable[[Path], None] | None):
    t = recipe.train
    meter = _throughput_meter(raw_model, accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # its engine steps inside backward
    previews = bool(t.sample_every) and layout is None
    if t.sample_every and layout is not None:
        warnings.warn("no preview grids with sharded parameters (ZeRO-3, FSDP): sampling on one rank would wait "
                      "for the other ranks' shards", RuntimeWarning, stacklevel=2)
    slots = accelerator.num_processes * max(recipe.data.num_workers, 1)
    positions: dict[int, Position] = {}
    window = LoggedMeans()
    logged: LoggedWindow | None = None
    graphs = t.compile and t.compile_mode in ("reduce-overhead", "max-autotune")
    bad_steps = NonFiniteSteps(t.max_bad_steps)
    metrics: dict[str, Any] = {}
    preview_batch = None
    bar = tqdm(total=t.steps, initial=step, disable=not (progress and accelerator.is_main_process),
               desc=f"train {recipe.model.kind}", dynamic_ncols=True)
    with StopRequest() as stop:
        while step < t.steps and not stop.requested:
            step_logs: dict[str, Any] = {}
            for _ in range(t.grad_accum):
                batch = _to_device(next(data), accelerator.device)
                if "position" in batch:
                    slot, epoch, emitted = batch.pop("position")
                    positions[slot] = (epoch, emitted)
                preview_batch = preview_batch or dict(batch)
                batch["step"] = step
                if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                with accelerator.accumulate(model):
                    loss, logs = model(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # Every rank sees the same all-reduced gradients, so all skip a bad step together.
                        norm = plain_norm(accelerator.clip_grad_norm_(model.parameters(),
                                                                      t.grad_clip if t.grad_clip > 0 else math.inf))
                        finite = finite_flag(norm, accelerator.device)
                        if norm is not None:
                            logs["grad_norm"] = norm
                        if not deepspeed:  # DeepSpeed's engine stepped in backward (its config refuses bad updates)
                            arm_skip(optimizer, finite)
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.update(_batch_size(batch))
                for key, value in {"loss": loss.detach(), **logs}.items():  # summed in float32 by LoggedMeans
                    step_logs[key] = value if t.grad_accum == 1 else step_logs.get(key, 0.0) + value / t.grad_accum
            step += 1
            scheduler.step()
            bar.update(1)
            ema.update(raw_model, layout.live() if layout else None, finite)
            window.add(step_logs, finite)
            bad_steps.record(step, finite, loss)  # judges the previous step
            last = step == t.steps or stop.requested
            log_now, save_now = step % t.log_every == 0 or last, step % t.ckpt_every == 0 or last
            if save_now:
                bad_steps.settle()
            ready = [logged] if logged else []  # closed a step ago: its GPU work is done, reading it waits little
            # A window closed now is read a step later (reading it now would wait for the GPU), unless none follows.
            logged = LoggedWindow(step, scheduler.get_last_lr()[0], window.close(), meter.close_window()) \
                if log_now else None
            if logged and (last or save_now):
                ready, logged = ready + [logged], None
            for closed in ready:
                metrics = _write_log(closed, accelerator, run_dir, bar) or metrics
            if save_now:
                data_position = _data_position(accelerator, positions, slots)
                states = gather_object([rng_state()])  # every rank's RNG, in rank order
                ema_state, weights = (layout.gather(ema.shadow), layout.gather(layout.live())) if layout \
                    else (ema.state_dict(), None)  # sharded (ZeRO-3, FSDP): full tensors on the main process
                fill = None
                if write_partition is not None:  # each rank writes its partition; the main process moves them in
                    staging = run_dir / "checkpoints" / f".step-{step:07d}.optimizer"
                    write_partition(staging)
                    accelerator.wait_for_everyone()
                    fill = partial(move_optimizer_partitions, staging, world=accelerator.num_processes)
                if accelerator.is_main_process:
                    save_training_checkpoint(run_dir, raw_model, ema_state, {
                        "step": step, "optimizer": None if fill else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "ema_updates": ema.updates, "rng": states,
                        "data": data_position}, keep=t.keep_checkpoints, weights=weights, fill=fill)
                accelerator.wait_for_everyone()
            if accelerator.is_main_process and previews and (step % t.sample_every == 0 or last):
                with ema.applied_to(raw_model):
                    write_preview(raw_model, preview_batch, run_dir / "samples" / f"step-{step:07d}.png")
    bar.close()
    metrics["step"] = step
    if stop.requested:
        metrics["stopped_by"] = stop.signal_name
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
