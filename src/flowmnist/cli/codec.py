"""`flowmnist compress | decompress`: lossless compression of digits by bits-back coding with a flow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import FlowmnistError
from .common import add_hidden_alias, out_file

DEFAULT_MODEL = "multi-vardeq-glow-wide-long"  # the best shipped MNIST model: compress uses it unless told otherwise
_WORKERS_HELP = "processes coding the file's streams side by side (default: the cores this process may use)"


def _codec_input(paths: list[str], shape: tuple[int, ...]):
    """(uint8 images (N, H, W), original bytes, source): one IDX file (gzipped or not), else PNG files
    or directories of them (the original is then the IDX file of their pixels, in order); images of the
    model's ``shape`` only."""
    import gzip
    import zlib

    import numpy as np

    from ..codec import idx_bytes
    from ..data import DataError, check_fit, check_images, parse_idx, read_png_digits

    first = Path(paths[0])
    if len(paths) == 1 and first.is_file() and first.suffix.lower() != ".png":
        raw = first.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{first}: not a valid gzip file ({e})") from e
        images = check_images(parse_idx(raw, str(first)), first)
        check_fit(images.shape, shape, first)
        return images, raw, "idx"
    images = read_png_digits(paths, shape)[:, 0].numpy()
    return images, idx_bytes(np.ascontiguousarray(images)), "png"


def _codec_bar(n: int, what: str):
    """A progress bar on stderr, where it is a terminal (as `train` shows its own) and the job is not tiny."""
    from tqdm import tqdm

    show = n >= 100 and sys.stderr.isatty()
    return tqdm(total=n, unit="img", desc=what, disable=not show, file=sys.stderr, leave=False)


def _workers(a: argparse.Namespace) -> int:
    from ..codec import usable_cores

    if a.workers is not None and a.workers < 1:
        raise FlowmnistError(f"--workers {a.workers}: give 1 or more")
    return a.workers or usable_cores()


def cmd_compress(a: argparse.Namespace) -> int:
    from ..codec import compress_images
    from ..config import atomic_write_bytes
    from ..runs import load_model, verify_pretrained

    if not a.pretrained and len(a.paths) >= 3 and (Path(a.paths[0]) / "config.json").is_file():
        run, name, paths = Path(a.paths[0]), f"run:{Path(a.paths[0]).resolve()}", a.paths[1:]
    else:
        pretrained = a.pretrained or DEFAULT_MODEL
        run, name, paths = verify_pretrained(pretrained), f"pretrained:{pretrained}", a.paths
    if len(paths) < 2:
        raise FlowmnistError("give the input (an IDX file, PNG files or a directory of them) and OUT")
    out = out_file(paths[-1], "OUT")
    model = load_model(run)[0]
    images, original, source = _codec_input(paths[:-1], model.image_shape)
    if a.streams is not None and not 1 <= a.streams <= max(1, len(images)):
        raise FlowmnistError(f"--streams {a.streams}: give 1 to {max(1, len(images))} for {len(images)} images")
    with _codec_bar(len(images), "compress") as bar:
        data, st = compress_images(
            model,
            images,
            name=name,
            original=original,
            source=source,
            progress=bar.update,
            streams=a.streams,
            workers=_workers(a),
        )
    atomic_write_bytes(out, data)
    print(
        f"{out}: {st.images} images, {len(data)} bytes, {st.rate_bpd:.4f} bits/dim; the model's single-sample bound "
        f"{st.bound_bpd:.4f} bits/dim (initial bits and header: {8 * len(data) - st.bound_bits:.0f} bits in all)"
    )
    return 0


def cmd_decompress(a: argparse.Namespace) -> int:
    import gzip

    from ..codec import decompress_bytes, read_header
    from ..config import atomic_write_bytes
    from ..runs import load_model, load_pretrained

    if len(a.paths) not in (2, 3):
        raise FlowmnistError("give [RUN_DIR] IN OUT, or --pretrained NAME IN OUT")
    run = a.paths[0] if len(a.paths) == 3 else getattr(a, "run", None)
    if run and a.pretrained:
        raise FlowmnistError("give either RUN_DIR or --pretrained NAME, not both")
    src, out = Path(a.paths[-2]), out_file(a.paths[-1], "OUT")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise FlowmnistError(f"{src}: cannot read ({e.strerror or e})") from e
    made_with = read_header(data, str(src)).model_name
    if a.pretrained or run:
        model = load_pretrained(a.pretrained) if a.pretrained else load_model(run)[0]
    elif made_with.startswith("pretrained:"):
        model = load_pretrained(made_with.removeprefix("pretrained:"))
    elif made_with.startswith("run:") and Path(made_with[4:]).exists():
        model = load_model(made_with[4:])[0]
    else:
        raise FlowmnistError(f"{src}: made with {made_with or 'an unnamed model'}; pass RUN_DIR or --pretrained NAME")
    with _codec_bar(read_header(data).count, "decompress") as bar:
        original, header = decompress_bytes(data, model, name=str(src), progress=bar.update, workers=_workers(a))
    atomic_write_bytes(out, gzip.compress(original, mtime=0) if out.suffix == ".gz" else original)
    what = "IDX file of the PNGs' pixels" if header.source == "png" else "IDX file"
    print(f"{out}: {header.count} images, the original {what} ({len(original)} bytes, CRC-32 checked)")
    return 0


def add_codec_commands(sub) -> None:
    c = sub.add_parser("compress", help="lossless compression of images by bits-back coding with a flow")
    c.add_argument(
        "paths", nargs="+", metavar="PATH", help="[RUN_DIR] IN... OUT: an IDX file (gzipped or not) or PNGs, then OUT"
    )
    c.add_argument("--pretrained", metavar="NAME", help=f"a shipped model (default {DEFAULT_MODEL}) instead of RUN_DIR")
    c.add_argument(
        "--streams",
        type=int,
        metavar="S",
        help="code the images as S independent streams that S cores code side by side (default: 2 from 2,000 "
        "images on, else 1, whatever the machine; each stream costs about 22 kbit of start-up bits)",
    )
    c.add_argument("--workers", type=int, metavar="N", help=_WORKERS_HELP)
    c.set_defaults(func=cmd_compress)
    d = sub.add_parser("decompress", help="restore the original IDX bytes of a compressed file exactly")
    d.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="[RUN_DIR] IN OUT: the model's run (default: the one the file names), a file written by "
        "`flowmnist compress`, the IDX file to write (gzipped if it ends in .gz)",
    )
    d.add_argument(
        "--pretrained", metavar="NAME", help="a shipped model instead of RUN_DIR (default: the one the file names)"
    )
    d.add_argument("--workers", type=int, metavar="N", help=_WORKERS_HELP)
    add_hidden_alias(d, "--run", "run", metavar="RUN_DIR")
    d.set_defaults(func=cmd_decompress)
