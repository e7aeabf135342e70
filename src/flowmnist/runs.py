"""The run directory and the shipped pretrained runs: config, metrics and checkpoint files, loading a
model from a run, and the SHA-256 manifest that guards the runs inside the package.

A run directory::

    config.json   the Config               metrics.csv  step,epoch,split,bpd,lr,seconds,cpu_seconds
    last.pt       resumable state           best.pt      best model by val bpd
    results.json  what `evaluate` measured

A shipped run (``src/flowmnist/pretrained/NAME/``) is the same directory with ``model.pt`` in place of
the training checkpoints: the float32 weights and the config, no optimizer state. Every file of it is
listed in ``pretrained/manifest.json`` with its SHA-256, checked before anything of it is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import FLOW_FIELDS, Config, FlowmnistError, atomic_write_bytes, first_difference
from .data import DATASETS
from .models import MODELS, FlowModel, build_model

FORMAT_VERSION = 1  # bump when the checkpoint layout changes; loading refuses other versions
METRIC_FIELDS = ("step", "epoch", "split", "bpd", "lr", "seconds", "cpu_seconds")
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv")
WEIGHTS = "model.pt"  # a shipped (weights-only) run's checkpoint
PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_FILES = ("config.json", "metrics.csv", "results.json", WEIGHTS)
DIGITS = "digits"  # real validation images shipped for the figures: IDX files, in the manifest too


def shipped_name(run: str | Path) -> str | None:
    """A shipped run's name (the folder under ``PRETRAINED_ROOT``), else None: how to name it to a user,
    to whom the install path means nothing."""
    run = Path(run).resolve()
    return run.name if run.parent == PRETRAINED_ROOT.resolve() else None


def digits_folder(dataset: str = "mnist") -> str:
    """The shipped images' folder of a dataset: ``digits`` for MNIST, ``digits-NAME`` for another."""
    return DIGITS if dataset == "mnist" else f"{DIGITS}-{dataset}"


def run_title(model: str, conditional: bool = False, dataset: str = "mnist") -> str:
    """A run's name in tables and figures: the model, with "conditional" and a dataset other than
    MNIST in brackets, e.g. "multi-vardeq (conditional)", "multi-vardeq (Fashion-MNIST)"."""
    notes = (["conditional"] if conditional else []) + ([DATASETS[dataset].title] if dataset != "mnist" else [])
    return f"{model} ({', '.join(notes)})" if notes else model


# ----------------------------------------------------------------------------------------------
# Files of a run
# ----------------------------------------------------------------------------------------------


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save tensors and plain containers only (loadable with weights_only=True), atomically."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint cannot run code. Refuses other format versions."""
    path = Path(path)
    if not path.is_file():
        raise FlowmnistError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, refused globals, truncated zip archives
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlowmnistError(f"{path}: not a loadable flowmnist checkpoint ({first})") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise FlowmnistError(f"{path}: not a flowmnist checkpoint (missing model or config)")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise FlowmnistError(
            f"{path}: checkpoint format version {version}, this flowmnist reads version {FORMAT_VERSION}"
        )
    return ckpt


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.csv as typed rows ([] when the run has none yet)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {
                "step": int(r["step"]),
                "epoch": int(r["epoch"]),
                "split": r["split"],
                "bpd": float(r["bpd"]),
                "lr": float(r["lr"]),
                "seconds": float(r["seconds"]),
                "cpu_seconds": float(r.get("cpu_seconds") or "nan"),  # nan: a log written before it was kept
            }
            for r in csv.DictReader(f)
        ]


def run_config(run_dir: str | Path) -> Config:
    """The run's config.json (written by ``train``); no checkpoint needed."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FlowmnistError(f"{run_dir}: no config.json; not a flowmnist run directory")
    verify_if_pretrained(path)
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise FlowmnistError(f"{path}: not a valid run config ({e})") from e


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix runs: an occupied directory needs --resume (continue) or --force (replace)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FlowmnistError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FlowmnistError(f"{run_dir}: nothing to resume (no last.pt)")
        return
    if any((run_dir / f).exists() for f in RUN_FILES) and not force:
        raise FlowmnistError(f"{run_dir}: already holds a run; pass --resume to continue it or --force to replace it")


def check_creatable(run_dir: Path) -> None:
    """Before any work: ``run_dir`` can be made where it is (its nearest existing ancestor is a directory),
    without making it, so that bad data found afterwards leaves nothing behind."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FlowmnistError(f"{run_dir}: cannot write to the run directory (Not a directory)")


def check_writable(run_dir: Path) -> None:
    """Make ``run_dir`` and prove it writable; remove temporary files a kill -9 left behind."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FlowmnistError(f"{run_dir}: cannot write to the run directory ({e.strerror or e})") from e
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink()


# ----------------------------------------------------------------------------------------------
# A model from a run
# ----------------------------------------------------------------------------------------------


def checkpoint_path(run: str | Path) -> Path:
    """A run directory's best.pt (else last.pt, else a shipped run's model.pt), or a checkpoint file."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise FlowmnistError(f"{run}: no such run directory or checkpoint")
    for name in ("best.pt", "last.pt", WEIGHTS):
        if (run / name).is_file():
            return run / name
    raise FlowmnistError(f"{run}: no checkpoint (best.pt, last.pt or {WEIGHTS}) in this run directory")


def model_of(cfg: Config) -> FlowModel:
    """The untrained model a config describes: its architecture, image shape, fast path and class prior."""
    return build_model(cfg.model, cfg.alpha, fast=cfg.fast, prior=cfg.prior_spec(), image_shape=cfg.image_shape)


def load_model(run: str | Path, device: str = "cpu") -> tuple[FlowModel, Config]:
    """Rebuild a model from its checkpoint alone (the config travels inside it), in eval mode."""
    verify_if_pretrained(run)
    path = checkpoint_path(run)
    ckpt = load_checkpoint(path, map_location=device)
    cfg = Config.from_dict(ckpt["config"])
    try:
        model = model_of(cfg)
    except ValueError as e:
        raise FlowmnistError(f"{path}: {e}") from e
    weights = dict(ckpt["model"])
    if ckpt.get("ema"):  # last.pt of a run with an EMA: evaluate the averaged weights, as best.pt holds
        weights.update(ckpt["ema"]["avg"])
    missing, unexpected = _state_mismatch(model.state_dict(), weights)
    if missing or unexpected:
        arch = ", ".join(f"{k}={v!r}" for k, v in cfg.architecture().items())
        raise FlowmnistError(
            f"{path}: weights do not fit model {cfg.model!r} ({arch}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected or mis-shaped tensors, e.g. "
            f"{(missing + unexpected)[0]})"
        )
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg


def _state_mismatch(want: dict[str, Tensor], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    missing = [k for k in want if k not in got]
    bad = [k for k in got if k not in want or not isinstance(got[k], Tensor) or got[k].shape != want[k].shape]
    return missing, bad


def training_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """What the training of a run took: optimizer steps, epochs (fractional) and wall-clock minutes
    (compilation and validation included); None where the run has no log or checkpoint."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    path = next((run_dir / n for n in ("last.pt", WEIGHTS) if (run_dir / n).is_file()), None)
    if not rows or path is None:
        return None
    st = load_checkpoint(path)["state"]
    if "epochs" in st:  # a shipped run records it
        epochs = st["epochs"]
    elif st.get("batch", 0) == 0 or "batches_per_epoch" in st:
        epochs = st["epoch"] + st.get("batch", 0) / st.get("batches_per_epoch", 1)
    else:
        epochs = None
    cpu = rows[-1].get("cpu_seconds", math.nan)
    return {
        "steps": st["step"],
        "epochs": None if epochs is None else round(epochs, 3),
        "minutes": round(rows[-1]["seconds"] / 60, 1),
        **({} if math.isnan(cpu) else {"cpu_minutes": round(cpu / 60, 1)}),
        **({"restarts": st["restarts"]} if st.get("restarts") else {}),
    }


# ----------------------------------------------------------------------------------------------
# Shipped pretrained runs
# ----------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    """{"runs": [NAME, ...], "files": {"NAME/FILE": sha256}} ({} where nothing is shipped)."""
    root = root or PRETRAINED_ROOT
    path = root / "manifest.json"
    if not path.is_file():
        return {"runs": [], "files": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["runs"], list) or not isinstance(manifest["files"], dict):
            raise TypeError("runs must be a list and files a mapping")
        return manifest
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FlowmnistError(f"{path}: not a valid pretrained manifest ({e})") from e


def pretrained_names(root: Path | None = None) -> list[str]:
    """The shipped runs, in the manifest's order."""
    root = root or PRETRAINED_ROOT
    return list(read_manifest(root)["runs"])


def _verify_files(folder: str, root: Path | None = None) -> Path:
    """Check every manifest entry under ``folder``; return its directory."""
    root = root or PRETRAINED_ROOT
    for key, digest in read_manifest(root)["files"].items():
        if key.split("/")[0] != folder:
            continue
        path = root / key
        if not path.is_file():
            raise FlowmnistError(f"{path}: missing from the shipped files (reinstall flowmnist)")
        if sha256(path) != digest:
            raise FlowmnistError(f"{path}: SHA-256 does not match the manifest; the file is changed or damaged")
    return root / folder


def verify_pretrained(name: str, root: Path | None = None) -> Path:
    """The shipped run ``name``'s directory, after checking every file of it against the manifest: a
    missing, changed or truncated file is refused, naming it, before anything of the run is read."""
    root = root or PRETRAINED_ROOT
    names = pretrained_names(root)
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise FlowmnistError(f"--pretrained {name}: no such shipped model (shipped: {have})")
    return _verify_files(name, root)


def shipped_digits(root: Path | None = None, dataset: str = "mnist") -> Path:
    """The directory of real validation images of ``dataset`` that ships with the models (an IDX
    directory), checked against the manifest: figures of shipped runs need no download."""
    root, folder = root or PRETRAINED_ROOT, digits_folder(dataset)
    if f"{folder}/train-images-idx3-ubyte.gz" not in read_manifest(root)["files"]:
        raise FlowmnistError(f"{root}: no shipped {dataset} images; pass --data-dir")
    return _verify_files(folder, root)


def shipped_digits_by_dataset(root: Path | None = None) -> dict[str, str]:
    """{dataset: its shipped images' directory} for every dataset that has some (each verified):
    figures of several shipped runs give each run the images of its own dataset."""
    root = root or PRETRAINED_ROOT
    folders = {key.split("/")[0] for key in read_manifest(root)["files"] if key.startswith(DIGITS)}
    names = {digits_folder(name): name for name in DATASETS}
    return {names[f]: str(shipped_digits(root, names[f])) for f in sorted(folders) if f in names}


def verify_if_pretrained(path: Path) -> None:
    """Check the shipped run that ``path`` belongs to, if it lies inside the package's pretrained root:
    loading a shipped file always goes through the manifest, whichever way the path was found."""
    try:
        rel = Path(path).resolve().relative_to(PRETRAINED_ROOT.resolve())
    except ValueError:
        return
    if rel.parts and rel.parts[0] != "manifest.json":
        _verify_files(rel.parts[0])


def pretrained_runs(names: list[str], root: Path | None = None) -> list[Path]:
    """Verified run directories for ``names``; ``all`` stands for every shipped run."""
    root = root or PRETRAINED_ROOT
    if "all" in names:
        names = pretrained_names(root)
        if not names:
            raise FlowmnistError("--pretrained all: this flowmnist ships no models")
    return [verify_pretrained(n, root) for n in names]


def load_pretrained(name: str, device: str = "cpu") -> FlowModel:
    """A shipped model by name (``flowmnist.pretrained_names()`` lists them), in eval mode.

    Every file of the run is checked against its SHA-256 first; the weights load with
    ``torch.load(weights_only=True)``."""
    return load_model(verify_pretrained(name), device)[0]


def initial_weights(source: str, cfg: Config) -> dict[str, Tensor]:
    """The weights that start a run with ``--init-from``: a shipped model's name or a run directory
    (its best or final weights, the EMA's if kept). Its architecture (``Config.architecture``) must be
    ``cfg``'s, except that a source without prior weights (an unconditional run) gives its flows alone to
    a conditional run, whose prior keeps the start its config draws; any other difference is refused in
    one line naming the field."""
    run = verify_pretrained(source) if source in pretrained_names() else Path(source)
    if not run.exists():
        raise FlowmnistError(
            f"--init-from {source}: neither a shipped model ({', '.join(pretrained_names())}) nor a run directory"
        )
    model, old = load_model(run)
    have, want = old.architecture(), cfg.architecture()
    if not old.conditional:  # nothing of a prior to give: the flows must match
        want = {k: want[k] for k in FLOW_FIELDS}
    key = first_difference(have, want)
    if key is not None:
        raise FlowmnistError(
            f"--init-from {source}: its model is {run_title(old.model, old.conditional)!r} with "
            f"{key}={have.get(key)!r}, this run's has {key}={want[key]!r}; the architectures must match"
        )
    return model.state_dict()


def export_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write a shipped run into ``out_dir`` from a trained ``run_dir``: config.json, metrics.csv,
    results.json, and ``model.pt`` holding the final float32 weights (last.pt's; its EMA average where
    the run kept one) and the config, without optimizer state. Returns the files written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for name in ("config.json", "metrics.csv", "results.json", "last.pt"):
        if not (run_dir / name).is_file():
            raise FlowmnistError(f"{run_dir / name}: missing; train and evaluate the run first")
    model, cfg = load_model(run_dir / "last.pt")
    cfg.data_dir = None  # the trainer's path means nothing elsewhere: data comes from --data-dir or a download
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    summary = training_summary(run_dir)
    save_checkpoint(
        out_dir / WEIGHTS,
        {"config": cfg.to_dict(), "model": state, "state": {"step": summary["steps"], "epochs": summary["epochs"]}},
    )
    results = json.loads((run_dir / "results.json").read_text())
    results.update(checkpoint=WEIGHTS, training=summary)
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "config.json", cfg.to_dict())
    atomic_write_bytes(out_dir / "metrics.csv", (run_dir / "metrics.csv").read_bytes())
    return [out_dir / name for name in PRETRAINED_FILES]


def write_manifest(root: Path | None = None) -> dict[str, Any]:
    """Record the SHA-256 of every file of every shipped run under ``root`` and of the shipped digits.
    Runs are listed in the order of ``models.MODELS``, then others by name, each run's files in
    ``PRETRAINED_FILES`` order."""
    root = root or PRETRAINED_ROOT

    def order(p: Path) -> tuple[int, str]:
        return (MODELS.index(p.name) if p.name in MODELS else len(MODELS), p.name)

    runs = sorted((p for p in root.iterdir() if p.is_dir() and (p / WEIGHTS).is_file()), key=order)
    files = {f"{run.name}/{name}": sha256(run / name) for run in runs for name in PRETRAINED_FILES}
    for digits in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(DIGITS)):
        files.update({f"{digits.name}/{p.name}": sha256(p) for p in sorted(digits.iterdir()) if p.is_file()})
    manifest = {"algorithm": "sha256", "runs": [r.name for r in runs], "files": files}
    write_json(root / "manifest.json", manifest)
    return manifest
