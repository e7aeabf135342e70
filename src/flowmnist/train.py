"""The training loop: Adam, LR warm-up and schedule (cosine over the wall-clock budget, or the reference
recipe's per-epoch decay), an EMA of the weights, bfloat16 mixed precision and compiled nets where they pay,
gradient clipping, a metrics log, atomic latest/best checkpoints, exact resume, skipped non-finite
steps, and clean stops on signals.

Run directory:
    config.json   the Config            metrics.csv  step,epoch,split,bpd,lr,seconds
    last.pt       resumable state       best.pt      best model by val bpd

Distributed (torchrun; see dist.py): the batch size is global and each rank takes a strided slice of
every global batch, so the ranks of one step together see exactly the batch one process would see.
DistributedDataParallel averages the gradients; validation is sharded and its sums all-reduced; rank 0
alone writes files. A checkpoint holds the unwrapped model, so it resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .config import Config, FlowmnistError, first_difference
from .data import check_classes, load_data
from .dist import Dist, process_group
from .models import FlowModel
from .nets import compile_nets, set_autocast
from .runs import (
    check_creatable,
    check_run_dir,
    check_writable,
    initial_weights,
    load_checkpoint,
    model_of,
    read_metrics,
    save_checkpoint,
    write_json,
    write_metrics,
)
from .runtime import native_bf16, set_tf32

_STOP_BUDGET = 1  # stop code for a budget (minutes or steps); below every handled signal, so a signal wins the MAX


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The batch order of an epoch, a function of (seed, epoch) only, so a resumed run that
    restarts mid-epoch sees exactly the batches it would have seen."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def noise_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of one rank's dequantization noise at one step (epoch, batch of the epoch).

    Training noise is a pure function of (seed, rank, step), not a random stream carried from step to
    step: ranks draw different noise; a resumed run draws what the uninterrupted run would have drawn;
    and resuming on another number of ranks is well defined (rank r draws what rank r of a run on that
    many ranks draws), with no per-rank random state to save. The hash keeps neighbouring steps' and
    ranks' seeds unrelated."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{epoch}:{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def val_noise(images: Tensor, seed: int) -> Tensor:
    """Dequantization noise u0 for a run's validation split (``seed``: the run's), drawn once: image i
    always gets row i, so the val bpd does not depend on how the split is sharded over ranks or batched,
    and the validations of a run are comparable with each other."""
    return torch.rand(images.shape, generator=torch.Generator().manual_seed(seed + 12345))


@torch.inference_mode()
def sharded_bpd(model: FlowModel, images: Tensor, noise: Tensor, env: Dist, batch_size: int = 256) -> float:
    """The bpd of a whole split from this rank's shard of it (``images``, ``noise``: rows rank, rank +
    world, ...). Sums and counts are all-reduced, not per-rank means, so unequal shards weigh right.
    For a conditional model this is the marginal bpd, -log2 sum_y p(x | y) p(y) / D: the number
    `evaluate` reports as bpd, comparable with unconditional runs' validations. (It exceeds the
    conditional bpd that the train rows log by at most -log2 p(y) / D, 0.004 for balanced digits at 28x28.)"""
    total = torch.zeros(2, dtype=torch.float64, device=model.device)
    for i in range(0, len(images), batch_size):
        x, u = images[i : i + batch_size], noise[i : i + batch_size]
        lp = model.log_prob_single(x, u.to(model.device)).double()
        total[0] -= lp.sum() / (model.dims * math.log(2))
        total[1] += len(x)
    total = env.all_sum(total)
    return float(total[0] / total[1])


def make_optimizer(model: nn.Module, lr: float, fused: bool = True) -> torch.optim.Adam:
    """Adam; ``fused``: PyTorch's fused kernel (one pass over all parameters instead of a dozen small
    ops per tensor: the same update up to float rounding), the fast path's choice. The plain path
    (``--plain``) keeps the per-tensor loop."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused else None)


def lr_at(cfg: Config, step: int, epoch: int, progress: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in ``epoch``; ``progress`` in [0, 1] is the
    fraction of the run done (of the wall-clock budget, or of all steps; used by "cosine").

        warm-up:  x min(1, (step + 1) / warmup_steps)
        cosine:   lr_min + (1 - lr_min) (1 + cos(pi progress)) / 2      (Loshchilov & Hutter 2017)
        step:     lr_decay ** epoch                                      (the reference's StepLR)

    A function of the run's position rather than a scheduler object: nothing to checkpoint, and a
    resumed run continues the same curve. (For a --minutes run the position is the clock, so its LR
    sequence, unlike an epochs run's, depends on the machine's speed.)"""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "step":
        return cfg.lr * warm * cfg.lr_decay**epoch
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * warm * (cfg.lr_min + (1 - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * p)))


class _EMA:
    """An exponential moving average of the parameters (Polyak averaging), the weights that validation,
    best.pt and evaluate use. The decay ramps up as min(ema, (1 + n) / (10 + n)) after n updates, so
    early averages are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float, state: dict[str, Any] | None = None):
        self.decay, self.n = decay, 0
        self.names = [k for k, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.avg = [p.detach().clone() for p in self.params]
        if state is not None:
            self.n = int(state["n"])
            for a, k in zip(self.avg, self.names, strict=True):
                a.copy_(state["avg"][k])

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1 - d)
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "avg": {k: a for k, a in zip(self.names, self.avg, strict=True)}}

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the average (twice restores both)."""
        for p, a in zip(self.params, self.avg, strict=True):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``Config.precision`` for ``device``: "auto" becomes bfloat16 where it is native, else float32."""
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


class _BatchLoss(nn.Module):
    """The training objective, mean bpd of a batch, as a module's forward: DistributedDataParallel
    synchronises gradients only for work done through the forward of the module it wraps (``bpd`` is
    not ``forward``). With labels ``y`` (a conditional run): the conditional bpd -log2 p(x | y) / D, or
    the hybrid objective with ``hybrid_weight`` (``FlowModel.hybrid_bpd``), which the train rows log."""

    def __init__(self, model: FlowModel, hybrid_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.hybrid_weight = hybrid_weight

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            return self.model.bpd(x).mean()
        return self.model.hybrid_bpd(x, y, self.hybrid_weight).mean()


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checks it at each step boundary, checkpoints and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_batch_size(batch_size: int, n_train: int, world: int) -> None:
    if n_train < batch_size:
        raise FlowmnistError(f"--batch-size {batch_size} is larger than the {n_train} training images")
    if batch_size % world:
        raise FlowmnistError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over the {world} ranks "
            f"(WORLD_SIZE={world})"
        )


def _resume_point(run_dir: Path, cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list]]:
    """last.pt, checked against ``cfg``; the log rows it counts (rows written after it are dropped: the
    resumed run produces them again); and the recipe's fields that ``cfg`` changes, as [before, after]."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    old = Config.from_dict(ckpt["config"])
    have, want = old.resume_identity(), cfg.resume_identity()
    key = first_difference(have, want)
    if key is not None:
        raise FlowmnistError(f"{run_dir}: cannot resume with {key}={want[key]!r}; the run has {have.get(key)!r}")
    before, after = old.to_dict(), cfg.to_dict()
    changed = {k: [before[k], v] for k, v in after.items() if before[k] != v}
    return ckpt, read_metrics(run_dir)[: ckpt["metrics_rows"]], changed


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
    *,
    tf32: bool = False,
) -> dict[str, Any]:
    """Train ``cfg.model``; returns a summary dict. Every state change that matters is on disk in
    ``run_dir`` before this returns or raises.

    Under torchrun (RANK and WORLD_SIZE in the environment, or a process group already made) every
    rank calls this with the same arguments; ``cfg.batch_size`` is the global batch. ``device``:
    cpu, cuda[:N], or auto (this local rank's GPU if CUDA is present, else the CPU). ``tf32`` is a GPU
    speed option (see runtime.set_tf32); like the device it is not part of the run's Config.
    """
    with process_group(device) as env:
        return _train(cfg, Path(run_dir), resume, force, env, progress, tf32)


@dataclasses.dataclass
class RunState:
    """Where a run is: saved in last.pt as a plain dict (``vars``), so a resumed run continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch consumed (skipped non-finite ones included)
    seconds: float = 0.0  # wall-clock seconds of training so far, over every resume
    cpu_seconds: float = 0.0  # this process's CPU seconds of training so far, over every resume (rank 0's)
    restarts: list = dataclasses.field(default_factory=list)  # each --resume: step, seconds, cpu, fields changed
    best_val: float = math.inf
    nonfinite: int = 0  # skipped steps in all
    batches_per_epoch: int = 0
    running: list[float] = dataclasses.field(default_factory=list)  # train bpd since the last train row
    bad_in_a_row: int = 0  # consecutive skipped steps (not saved: a resumed run starts counting afresh)

    def saved(self) -> dict[str, Any]:
        kept = {k: v for k, v in vars(self).items() if k != "bad_in_a_row"}
        return kept | {"running": list(self.running), "restarts": list(self.restarts)}


@dataclasses.dataclass
class Run:
    """Everything a training run works with, built once by ``start_run``."""

    cfg: Config
    run_dir: Path
    env: Dist
    model: FlowModel
    opt: torch.optim.Adam
    ema: _EMA | None
    step_loss: nn.Module  # the batch objective; DDP-wrapped under torchrun
    train_x: Tensor
    train_y: Tensor | None  # labels, for a conditional run
    val_x: Tensor  # this rank's shard of the validation split, and its fixed noise
    val_u: Tensor
    train_dtype: torch.dtype | None  # the nets' autocast dtype in training steps (validation: float32)
    st: RunState
    rows: list[dict[str, Any]]  # metrics.csv
    t0: float  # perf_counter at the run's (virtual) start: now minus the seconds trained before
    cpu0: float  # process_time likewise: CPU seconds count the core-minutes a run had on a shared machine
    budget: float  # seconds; inf without --minutes
    bar: Any = None
    saved_at: float = 0.0  # elapsed() at the last save of last.pt
    validated_at: float = 0.0  # elapsed() at the last validation
    val_seconds: float = 0.0  # what the next validation is expected to take: a --minutes budget ends with one

    @property
    def total_steps(self) -> int:
        steps = self.cfg.epochs * self.st.batches_per_epoch
        return min(steps, self.cfg.steps) if self.cfg.steps else steps

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def cpu_elapsed(self) -> float:
        return time.process_time() - self.cpu0


def start_run(cfg: Config, run_dir: Path, resume: bool, force: bool, env: Dist, tf32: bool) -> Run:
    """Check the options and the directory, load the data, build or restore model and optimizer."""
    device = env.device
    with env.agreed():  # a setup error on any rank stops every rank; all read, only rank 0 writes
        cfg.check()
        # Saved resolved: the run's actual recipe. (A copy: the caller's Config is left as it was.)
        cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
        check_run_dir(run_dir, resume, force)
        check_creatable(run_dir)
        data = load_data(cfg, fit=False)  # before the run directory is made: bad data leaves nothing behind
        cfg = dataclasses.replace(cfg, image_shape=data.shape)  # the model is built for the data's size
        if cfg.conditional:  # as many classes as the data names (MNIST: the ten digits), saved resolved
            cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or len(data.classes))
            check_classes(data, cfg.num_classes)
        if env.is_main:
            check_writable(run_dir)
        _check_batch_size(cfg.batch_size, len(data.images["train"]), env.world)
        ckpt, rows, changed = _resume_point(run_dir, cfg) if resume else (None, [], {})
        init = initial_weights(cfg.init_from, cfg) if cfg.init_from and ckpt is None else None

    torch.manual_seed(cfg.seed)
    model = model_of(cfg).to(device)
    if init is not None:  # weights the source lacks (a fresh prior) keep their start
        model.load_state_dict(model.state_dict() | init)
    elif ckpt is None:  # ActNorm's data-dependent start: the first training images, the same on every rank
        model.initialize(data.images["train"][:512].to(device))
    if cfg.conditional:  # p(y) = the training labels' frequencies, kept in the model
        model.prior.set_class_frequencies(data.labels["train"])
    opt = make_optimizer(model, cfg.lr, fused=cfg.fast)
    st = RunState()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        st = RunState(**ckpt["state"])
        restart = {"step": st.step, "seconds": round(st.seconds, 1), "cpu_seconds": round(st.cpu_seconds, 1)}
        st.restarts.append(restart | ({"changed": changed} if changed else {}))  # a recipe changed mid-run
        torch.set_rng_state(ckpt["rng"])  # rank 0's; training noise is reseeded per step (noise_seed)
    if env.is_main:
        write_metrics(run_dir / "metrics.csv", rows)
        write_json(run_dir / "config.json", cfg.to_dict())
    ema = _EMA(model, cfg.ema, ckpt.get("ema") if ckpt is not None else None) if cfg.ema else None
    if device.type == "cuda":
        set_tf32(tf32)
    if cfg.compile:
        compile_nets(model)
    step_loss: nn.Module = _BatchLoss(model, cfg.hybrid_weight)
    if env.distributed:  # DDP averages the step's gradients over ranks
        step_loss = DistributedDataParallel(step_loss, device_ids=[device.index] if device.type == "cuda" else None)
    train_x, val_x = data.images["train"], data.images["val"][: cfg.val_images or None]
    st.batches_per_epoch = len(train_x) // cfg.batch_size  # the last partial batch is dropped: constant shapes
    # MNIST is 47 MB as uint8: keep it resident on the device, so a step copies nothing from the host.
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        env=env,
        model=model,
        opt=opt,
        ema=ema,
        step_loss=step_loss,
        train_x=train_x.to(device),
        train_y=data.labels["train"].to(device) if cfg.conditional else None,
        val_x=val_x[env.rank :: env.world].to(device),
        val_u=val_noise(val_x, cfg.seed)[env.rank :: env.world].to(device),
        train_dtype=torch.bfloat16 if cfg.precision == "bfloat16" else None,
        st=st,
        rows=rows,
        t0=time.perf_counter() - st.seconds,
        cpu0=time.process_time() - st.cpu_seconds,
        budget=cfg.minutes * 60 if cfg.minutes is not None else math.inf,
        saved_at=st.seconds,
        validated_at=st.seconds,
    )


def log(run: Run, split: str, bpd: float) -> None:
    """Append a metrics row; rank 0 rewrites metrics.csv at once (small; resume trims rows the
    checkpoint does not cover)."""
    row = {"step": run.st.step, "epoch": run.st.epoch, "split": split, "bpd": bpd}
    times = {"seconds": round(run.elapsed(), 3), "cpu_seconds": round(run.cpu_elapsed(), 3)}
    run.rows.append(row | {"lr": run.opt.param_groups[0]["lr"]} | times)
    if run.env.is_main:
        write_metrics(run.run_dir / "metrics.csv", run.rows)


def log_running(run: Run) -> None:
    """A train row with the mean bpd of the steps since the last one (if any)."""
    if run.st.running:
        log(run, "train", sum(run.st.running) / len(run.st.running))
        run.st.running = []


def save_last(run: Run) -> None:
    """last.pt: everything a resume needs. metrics.csv already holds every row; metrics_rows says how
    many of them this state covers."""
    run.st.seconds = run.saved_at = run.elapsed()
    run.st.cpu_seconds = run.cpu_elapsed()
    if not run.env.is_main:
        return
    state = {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "state": run.st.saved(),
        "rng": torch.get_rng_state(),
        "metrics_rows": len(run.rows),
    }
    save_checkpoint(run.run_dir / "last.pt", state)


@torch.inference_mode()
@contextlib.contextmanager
def evaluating(run: Run) -> Iterator[None]:
    """The model as validation sees it: eval mode, float32 nets and the EMA's weights where kept; the
    training state (train mode, the run's autocast dtype, the raw weights) comes back afterwards."""
    model = run.model
    model.eval()
    set_autocast(model, None)
    if run.ema is not None:
        run.ema.swap()
    try:
        yield
    finally:
        if run.ema is not None:
            run.ema.swap()
        set_autocast(model, run.train_dtype)
        model.train()


def estimate_val_seconds(run: Run, batch_size: int = 256) -> float:
    """Seconds a validation will take, measured once before a --minutes run's first step, so that the
    budget's end leaves room for the final validation: two tiny batches first (compiled nets compile
    here for any batch size, not in the final validation), then one validation batch is timed and scaled
    to the split. Every rank makes the same calls (each holds a collective)."""
    model, x, u, env = run.model, run.val_x, run.val_u, run.env
    with evaluating(run):
        for n in (1, 2):  # two shapes: torch.compile then makes the batch dimension dynamic
            sharded_bpd(model, x[:n], u[:n], env, batch_size)
        head = min(batch_size, len(x))
        t = time.perf_counter()
        sharded_bpd(model, x[:head], u[:head], env, batch_size)
        per_image = (time.perf_counter() - t) / max(head, 1)
    return per_image * len(x)


def validate(run: Run) -> float:
    """Val bpd (single-sample bound, the run's fixed noise, float32; the EMA weights if kept), logged;
    best.pt when it is the best so far. Its duration is the estimate of the next one's."""
    model, st = run.model, run.st
    run.validated_at = started = run.elapsed()
    with evaluating(run):
        val = sharded_bpd(model, run.val_x, run.val_u, run.env)
        log(run, "val", val)
        if val < st.best_val:
            st.best_val = val
            if run.env.is_main:
                best = {"step": st.step, "epoch": st.epoch, "val_bpd": val}
                save_checkpoint(
                    run.run_dir / "best.pt", {"config": run.cfg.to_dict(), "model": model.state_dict(), "state": best}
                )
    run.val_seconds = run.elapsed() - started
    return val


def stop_reason(run: Run, stop: _StopFlag) -> str | None:
    """ "minutes", "steps", "SIGINT" or "SIGTERM" when the run must stop before the next step, else None. A
    stop one rank sees (its signal, its clock) is agreed by all, so none is left waiting in a collective."""
    steps_done = bool(run.cfg.steps) and run.st.step >= run.cfg.steps  # the same on every rank
    out_of_time = run.elapsed() + run.val_seconds >= run.budget  # the final validation inside the budget
    code = run.env.agree_max(stop.signum or (_STOP_BUDGET if steps_done or out_of_time else 0))
    if not code:
        return None
    if code == _STOP_BUDGET:
        return "steps" if steps_done else "minutes"
    return signal.Signals(code).name


def train_step(run: Run, order: Tensor) -> None:
    """One optimizer step on the next batch of ``order``; a step whose loss or gradient is not finite
    is skipped (weights kept) and logged, and too many in a row stop the run."""
    cfg, st, env = run.cfg, run.st, run.env
    start = st.batch * cfg.batch_size
    idx = order[start + env.rank : start + cfg.batch_size : env.world]  # this rank's strided shard
    torch.manual_seed(noise_seed(cfg.seed, env.rank, st.epoch, st.batch))
    progress = max(run.elapsed() / run.budget, st.step / run.total_steps)  # whichever limit ends the run first
    for g in run.opt.param_groups:
        g["lr"] = lr_at(cfg, st.step, st.epoch, progress)
    y = None if run.train_y is None else run.train_y[idx]
    loss = run.step_loss(run.train_x[idx]) if y is None else run.step_loss(run.train_x[idx], y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    st.batch += 1
    # The gradients (so gnorm) are already common; agree on the loss and its finiteness too.
    bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
    loss_sum, n_bad = env.all_sum(torch.stack([loss.detach().double(), bad.double()])).tolist()
    if n_bad:
        _skip_step(run, loss_sum / env.world)
        return
    st.bad_in_a_row = 0
    run.opt.step()
    if run.ema is not None:
        run.ema.update()
    st.step += 1
    st.running.append(loss_sum / env.world)
    run.bar.update(1)
    if st.step % cfg.log_every == 0:
        log_running(run)
        run.bar.set_postfix(bpd=f"{run.rows[-1]['bpd']:.3f}")


def _skip_step(run: Run, loss: float) -> None:
    st = run.st
    st.nonfinite += 1
    st.bad_in_a_row += 1
    log(run, "nonfinite", loss)
    if st.bad_in_a_row >= run.cfg.max_nonfinite:
        run.bar.close()
        raise FlowmnistError(
            f"training stopped: {st.bad_in_a_row} non-finite losses or gradients in a row at step {st.step}; "
            f"the last good checkpoint is kept in {run.run_dir / 'last.pt'}"
        )


def run_epoch(run: Run, stop: _StopFlag) -> str | None:
    """The rest of the current epoch: steps, the periodic validations, and at its end a validation
    (unless --val-every sets its own) and a checkpoint. Returns the stop reason if it stopped early."""
    cfg, st = run.cfg, run.st
    order = epoch_order(len(run.train_x), cfg.seed, st.epoch).to(run.env.device)
    while st.batch < st.batches_per_epoch:
        reason = stop_reason(run, stop)
        if reason:
            return reason
        stepped = st.step
        train_step(run, order)
        if cfg.val_every and st.step != stepped and st.step % cfg.val_every == 0:
            validate(run)
            save_last(run)
        elif cfg.val_minutes and run.env.agree_max(int(run.elapsed() - run.validated_at >= cfg.val_minutes * 60)):
            validate(run)  # collective: the ranks agree on when (their clocks differ slightly)
            save_last(run)
        elif run.elapsed() - run.saved_at >= cfg.checkpoint_minutes * 60:
            save_last(run)  # rank 0 writes; the others only note the time
    log_running(run)
    if not (cfg.val_every or cfg.val_minutes):
        validate(run)
    st.epoch, st.batch = st.epoch + 1, 0
    save_last(run)
    return None


def finish(run: Run, stopped_by: str) -> None:
    """The last rows and checkpoint: a budget stop ends with a validation (the run's final val bpd); a
    signal stops at once, carrying its running train average in the checkpoint."""
    if not stopped_by.startswith("SIG"):
        log_running(run)
    last_val = next((r for r in reversed(run.rows) if r["split"] == "val"), None)
    if stopped_by in ("minutes", "steps") and (last_val is None or last_val["step"] != run.st.step):
        validate(run)  # unless a periodic validation was already at this step
    save_last(run)


def _train(
    cfg: Config, run_dir: Path, resume: bool, force: bool, env: Dist, progress: bool | None, tf32: bool
) -> dict[str, Any]:
    run = start_run(cfg, run_dir, resume, force, env, tf32)
    st = run.st
    show = env.is_main and (sys.stderr.isatty() if progress is None else progress)
    nb = st.batches_per_epoch
    run.bar = tqdm(total=run.total_steps, initial=st.epoch * nb + st.batch, disable=not show, unit="step")
    run.model.train()
    set_autocast(run.model, run.train_dtype)
    if run.cfg.minutes is not None:
        run.val_seconds = estimate_val_seconds(run)
    stopped_by = "epochs"
    with _StopFlag() as stop:
        while st.epoch < run.cfg.epochs:
            reason = run_epoch(run, stop)
            if reason:
                stopped_by = reason
                break
        finish(run, stopped_by)
    run.bar.close()
    env.barrier()  # no rank returns before rank 0's files are complete
    vals = [r["bpd"] for r in run.rows if r["split"] == "val"]
    return {
        "run_dir": str(run_dir),
        "model": run.cfg.model,
        "step": st.step,
        "epoch": st.epoch,
        "stopped_by": stopped_by,
        "val_bpd": vals[-1] if vals else math.nan,
        "best_val_bpd": st.best_val,
        "seconds": round(run.elapsed(), 1),
        "cpu_seconds": round(run.cpu_elapsed(), 1),
        "nonfinite_steps": st.nonfinite,
        "world_size": env.world,
    }
