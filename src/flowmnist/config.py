"""The one run config, the project's error type, and the atomic file write every module uses."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "step")
PRECISIONS = ("auto", "float32", "bfloat16")
CLASS_LATENTS = ("all", "top")  # where a conditional model's class means sit (priors.ClassPrior)
NUM_CLASSES = 10  # the digits 0-9: the labels of a conditional model
FLOW_FIELDS = ("model", "alpha", "image_shape")  # the part of ``Config.architecture`` the flows' weights depend on
MNIST_SHAPE = (1, 28, 28)  # (channels, height, width) of MNIST and Fashion-MNIST: the shipped models' images


@dataclass(frozen=True)
class PriorSpec:
    """The prior on a model's flat latent, as data: ``kind`` names an entry of ``priors.PRIORS``
    ("normal": N(0, I); "class": a Gaussian per class, ``priors.ClassPrior``), the rest are that kind's
    options (the class prior's ``num_classes``, where its means sit, their initial spread, fixed or
    trained). ``priors.build_prior`` turns it into the prior; ``Config.prior_spec`` derives it from a run."""

    kind: str = "normal"
    num_classes: int = NUM_CLASSES
    latent: str = "all"
    spread: float = 0.0
    fixed: bool = False


class FlowmnistError(Exception):
    """An error the user can fix (bad file, bad option); the CLI prints it as one line."""


@dataclass
class Config:
    """Everything that defines a run. Saved in config.json and inside every checkpoint, so that
    evaluate / sample / interpolate rebuild the model from the run directory alone."""

    model: str = "multi-vardeq"  # a name in models.ARCHITECTURES
    data_dir: str | None = None  # a data directory (data.read_dir: IDX, NumPy, PNG folders); None = the download cache
    dataset: str = "mnist"  # what data_dir=None downloads (data.DATASETS: mnist | fashion-mnist), cached apart
    seed: int = 0  # model init, batch order and dequantization noise
    epochs: int = 200  # the original report's GPU budget; on a CPU, `--epochs` or `--minutes` sets a smaller one
    minutes: float | None = None  # wall-clock budget for training (validation included)
    # Small, for a CPU: there images/s fall only slowly as the batch shrinks, so a small batch buys many
    # more updates per minute (benchmarks/budget_recipe.py compares batch sizes). On GPUs pass 128 or
    # more. The global batch under torchrun.
    batch_size: int = 16
    lr: float = 2e-3  # Adam's peak LR: 2x the reference recipe's 1e-3, affordable with the warm-up and a
    # schedule that ends near zero, and faster progress in a short budget
    # The learning-rate schedule after warm-up. "cosine": from lr down to lr * lr_min over the run, where
    # the run is the wall-clock budget when `minutes` is set (progress = elapsed / budget, so the last
    # steps of a budget run are taken at a small LR, whatever the machine's speed) and `epochs` otherwise.
    # "step": x lr_decay once per epoch, the reference's StepLR (it barely decays within a CPU budget).
    schedule: str = "cosine"
    lr_decay: float = 0.99  # the "step" schedule's factor per epoch, as the reference
    lr_min: float = 0.0  # the cosine schedule's final LR, as a fraction of lr
    warmup_steps: int = 50  # linear LR warm-up from lr / warmup_steps: Adam's first full-size steps can
    # throw the couplings' scales far off before its second-moment estimates settle
    # Decay of an exponential moving average of the weights, which validation, best.pt and evaluate use
    # (0: off, the raw weights). Off by default: with the cosine schedule ending near LR 0 the last
    # weights are already settled. Useful with the "step" schedule.
    ema: float = 0.0
    grad_clip: float = 1.0  # max global grad norm: couplings can spike early in training
    alpha: float = 1e-5  # logit-transform squeeze: keeps logit(0) finite at a tiny bpd cost
    split_seed: int = 42  # fixed, so val is the same images for every run seed
    val_fraction: float = 1 / 6  # 10,000 of 60,000 as the original report; same share of smaller files
    log_every: int = 10  # steps between train-bpd rows in metrics.csv
    val_every: int = 0  # steps between validations (0: once per epoch and at the end)
    val_minutes: float = 0.0  # minutes of training between validations (0: by val_every), for curves by time
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before training gives up
    # The CPU fast path (channels-last nets, fused layer norm, lean ConcatELU): the same function and
    # state_dict as the plain code (False) within float rounding, faster and leaner to train.
    fast: bool = True
    # torch.compile the coupling nets' blocks (nets.compile_nets): inductor fuses their elementwise work
    # (`flowmnist bench` measures it); the first steps pay the compilation. Same function, float rounding aside.
    compile: bool = True
    # Precision of the coupling nets' convolutions in training steps: "float32", "bfloat16" (mixed
    # precision: weights, optimizer, couplings, log-determinants and validation stay float32; only the
    # nets' convolutions and activations of the gradient computation are bfloat16, about twice as fast
    # where the hardware has bf16), or
    # "auto" (bfloat16 where the device has it natively, else float32; resolved when training starts and
    # saved resolved). Validation and evaluate are always float32.
    precision: str = "auto"
    # Start from these weights (a shipped model's name or a run directory) with a fresh optimizer and
    # schedule: fine-tuning, or a warm restart of a run whose directory was lost. Same architecture only
    # (Config.architecture), but for a conditional run from an unconditional model: its flows, the prior fresh.
    init_from: str | None = None
    checkpoint_minutes: float = 10.0  # last.pt at least this often, whatever the epoch length: a kill loses less
    val_images: int = 0  # validate on the first N validation images (0: all): cheaper curves for short runs
    conditional: bool = False  # model p(x | y): a Gaussian prior per digit (priors.ClassPrior); labels: the data's
    hybrid_weight: float = 0.0  # lambda of -(log p(x|y) + lambda log p(y|x)), Nalisnick et al. 2019; conditional only
    # Where a conditional model's class means sit: "all" the whole flat latent, "top" the final latent
    # (the multi-scale flow's deepest features; priors.ClassPrior).
    class_latent: str = "all"
    class_spread: float = 0.0  # std of the initial class means (0: all at 0, the unconditional twin's start)
    class_fixed: bool = False  # keep those means and unit scales fixed (FlowGMM): the flow alone separates the digits
    steps: int = 0  # optimizer-step budget (0: none): equal budgets that a busy CPU does not shorten
    # (channels, height, width) of the images the model is built for: training sets it from its data;
    # MNIST's by default, so a model named without data (build, hubconf) is an MNIST model.
    image_shape: tuple[int, int, int] = MNIST_SHAPE
    # A conditional model's number of classes: training sets it from its data's labels (0: not yet set,
    # which a model named without data reads as MNIST's ten digits).
    num_classes: int = 0

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(n) for n in self.image_shape)  # JSON gives back a list

    def check(self) -> None:
        """Refuse values no run can use, naming the option (the CLI checks types and signs itself)."""
        if self.schedule not in SCHEDULES:
            raise FlowmnistError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise FlowmnistError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.ema < 1:
            raise FlowmnistError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.lr_min <= 1:
            raise FlowmnistError(f"lr_min must be in [0, 1] (a fraction of lr), got {self.lr_min}")
        if not self.checkpoint_minutes > 0:
            raise FlowmnistError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.val_minutes < 0:
            raise FlowmnistError(f"val_minutes must be >= 0 (0: by val_every), got {self.val_minutes}")
        if self.val_images < 0:
            raise FlowmnistError(f"val_images must be >= 0 (0: all), got {self.val_images}")
        if self.warmup_steps < 0:
            raise FlowmnistError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.hybrid_weight < float("inf"):
            raise FlowmnistError(f"hybrid_weight must be a finite number >= 0, got {self.hybrid_weight}")
        if self.hybrid_weight and not self.conditional:
            raise FlowmnistError("hybrid_weight needs a conditional model (--conditional)")
        if self.class_latent not in CLASS_LATENTS:
            raise FlowmnistError(f"class_latent must be one of {CLASS_LATENTS}, got {self.class_latent!r}")
        if (self.class_latent != "all" or self.class_spread or self.class_fixed) and not self.conditional:
            raise FlowmnistError("class_latent, class_spread and class_fixed need a conditional model (--conditional)")
        if self.class_fixed and not self.class_spread:
            raise FlowmnistError("class_fixed needs class_spread > 0 (else every class is the same Gaussian)")
        if not 0 <= self.class_spread < float("inf"):
            raise FlowmnistError(f"class_spread must be a finite number >= 0, got {self.class_spread}")
        if self.steps < 0:
            raise FlowmnistError(f"steps must be >= 0 (0: no step budget), got {self.steps}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise FlowmnistError(f"num_classes must be 0 (from the data) or >= 2, got {self.num_classes}")
        check_shape(self.image_shape, "image_shape")

    def prior_spec(self) -> PriorSpec:
        """The run's prior: the class prior for a conditional run, else N(0, I)."""
        if not self.conditional:
            return PriorSpec()
        return PriorSpec(
            "class", self.num_classes or NUM_CLASSES, self.class_latent, self.class_spread, self.class_fixed
        )

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the weights' shapes and meaning, in the order a mismatch is named: the flows
        (``model``, ``alpha``: the logit squeeze the flows were trained behind, ``image_shape``: the size a
        class prior and self-attention are built for), then the prior (its kind,
        and a class prior's classes, latent and whether its means are trained). ``--resume``, ``--init-from`` and
        loading a model compare these; ``class_spread`` only draws the start, so it is not among them."""
        arch: dict[str, Any] = {k: getattr(self, k) for k in FLOW_FIELDS} | {"conditional": self.conditional}
        if self.conditional:
            classes = self.num_classes or NUM_CLASSES
            arch |= {"num_classes": classes, "class_latent": self.class_latent, "class_fixed": self.class_fixed}
        return arch

    def resume_identity(self) -> dict[str, Any]:
        """What a resumed run must keep: its architecture, and the seed, batch and split that fix the
        order of its batches, its noise and its validation images."""
        return self.architecture() | {k: getattr(self, k) for k in ("seed", "batch_size", "split_seed", "val_fraction")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FlowmnistError(f"config has unknown fields {sorted(unknown)} (from a newer flowmnist?)")
        # A config saved before a field existed ran without it: fill in the value that reproduces that
        # run (resuming an old run must not switch it to today's recipe), not today's default.
        return cls(**{**{k: v for k, v in BEFORE_FIELD.items() if k in known}, **d})


# What runs saved before these fields existed did (the reference recipe, eager float32 nets).
BEFORE_FIELD: dict[str, Any] = {
    "schedule": "step",
    "warmup_steps": 0,
    "ema": 0.0,
    "lr_min": 0.0,
    "compile": False,
    "precision": "float32",
    "dataset": "mnist",
    "conditional": False,
    "hybrid_weight": 0.0,
    "image_shape": MNIST_SHAPE,
    "num_classes": NUM_CLASSES,
}


def check_shape(shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """``shape`` as (channels, height, width) that every architecture fits: one channel, height and width
    positive multiples of 4 (each architecture squeezes 2 x 2 twice); else one line naming ``what``."""
    shape = tuple(shape)
    if len(shape) != 3 or shape[0] != 1 or min(shape) < 1 or shape[1] % 4 or shape[2] % 4:
        raise FlowmnistError(
            f"{what} {'x'.join(map(str, shape))}: expected 1 x H x W (grayscale), height and width multiples of 4"
        )
    return shape  # type: ignore[return-value]


def first_difference(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first key of ``want`` whose value ``have`` does not share (None: they agree on every key)."""
    return next((k for k in want if k not in have or have[k] != want[k]), None)


def prepare_output(path: str | Path, option: str, *, is_dir: bool = False, make: bool = True) -> Path:
    """The one check of an output path before any work: a directory where a file is expected (or a file
    where a directory is) refused, the nearest existing folder writable, and (``make``) the folder made:
    the path itself for ``is_dir``, else its parent. Every failure is one line naming the option and path
    (no permission, a read-only file system, a file in the way)."""
    path = Path(path)
    if is_dir and path.exists() and not path.is_dir():
        raise FlowmnistError(f"{option} {path}: exists and is not a directory")
    if not is_dir and path.is_dir():
        raise FlowmnistError(f"{option} {path}: is a directory; expected a file name")
    existing = path.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise FlowmnistError(f"{option} {path}: directory {existing} is not writable")
    folder = path if is_dir else path.parent
    if make:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FlowmnistError(f"{option} {path}: cannot make the folder {folder} ({e.strerror or e})") from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: a crash at
    any moment leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail with a bare IsADirectoryError
        raise FlowmnistError(f"{path}: is a directory; expected a file name")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
