"""Out-of-distribution (OOD) scores of a flow model, and how well they separate two sets of images.

Convention throughout: a higher score means "more out-of-distribution", and OOD is the positive class.

Scores (per image unless said otherwise):
  bpd          the model's importance-weighted bits per dimension, -log2 p(x) / D
  corrected    the complexity-corrected bpd of Serrà et al. (2020), S(x) = bpd(x) - L(x), where the
               complexity L(x) = PNG bits / D (``complexity_bpd``)
  typicality-M the typicality statistic of Nalisnick et al. (2019) for batches of M images
Metrics: AUROC, AUPR (average precision) and the FPR at 95% TPR, each exact with tied scores.

The metrics and scores take arrays; reading image files is data.py's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .config import FlowmnistError
from .evaluate import image_bpd
from .models import FlowModel
from .tables import Table

PNG_LEVEL = 9  # zlib's maximum compression, as Serrà et al. used for PNG
BATCH_SIZES = (1, 5, 10, 25)  # typicality batch sizes M that `flowmnist ood` reports by default

# ----------------------------------------------------------------------------------------------
# Metrics: higher score = more OOD, OOD is the positive class
# ----------------------------------------------------------------------------------------------


def _two_sets(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise FlowmnistError(f"an OOD metric needs scores in both sets (got {a.size} in-distribution, {b.size} OOD)")
    if np.isnan(a).any() or np.isnan(b).any():
        raise FlowmnistError(
            f"NaN scores ({int(np.isnan(a).sum())} in-distribution, {int(np.isnan(b).sum())} OOD): "
            "the model gives no finite likelihood for some images"
        )
    return a, b


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve, as the Mann-Whitney statistic (Hanley & McNeil 1982):

        AUROC = 1/(n·m) · Σ_i Σ_j [ 1(o_j > a_i) + ½ · 1(o_j = a_i) ]

    over the n in-distribution scores a_i and m OOD scores o_j: the probability that a random OOD
    image scores higher than a random in-distribution one, a tie counting one half. 0.5 is chance,
    1 a perfect separation. Exact (integer counts), O((n + m) log n)."""
    a, b = _two_sets(in_scores, out_scores)
    s = np.sort(a)
    below = np.searchsorted(s, b, side="left")  # per o_j: #{a_i < o_j}
    at_or_below = np.searchsorted(s, b, side="right")  # per o_j: #{a_i <= o_j}
    return float((int(below.sum()) + int(at_or_below.sum())) / (2 * a.size * b.size))


def aupr(in_scores, out_scores) -> float:
    """Area under the precision-recall curve (OOD positive) as average precision:

        AP = Σ_k (R_k − R_{k−1}) · P_k,   R_0 = 0

    over the distinct score values t_1 > t_2 > … (flagging "score ≥ t_k" as OOD), with
    TP_k = #{o_j ≥ t_k}, FP_k = #{a_i ≥ t_k}, P_k = TP_k / (TP_k + FP_k), R_k = TP_k / m. Tied
    scores are one threshold, so the value does not depend on how ties are ordered; no
    interpolation (the step-wise sum of scikit-learn's average_precision_score). Chance is m/(n+m)."""
    a, b = _two_sets(in_scores, out_scores)
    scores = np.concatenate([b, a])
    positive = np.concatenate([np.ones(b.size), np.zeros(a.size)])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.append(scores[1:] != scores[:-1], True)  # one threshold per distinct value
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(1 - positive)[last_of_tie]
    recall_steps = np.diff(np.concatenate([[0.0], tp / b.size]))
    return float(np.sum(recall_steps * tp / (tp + fp)))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """False-positive rate at the threshold that detects at least ``tpr`` of the OOD images:

        t* = max{ t : #{o_j ≥ t} / m ≥ tpr },  i.e. the ⌈tpr·m⌉-th largest OOD score
        FPR = #{a_i ≥ t*} / n

    (flagging "score ≥ t*" as OOD: in-distribution scores tied with t* count as false positives).
    With the default, "FPR95": 0 is perfect, about 0.95 is chance. ⌈tpr·m⌉ is taken after rounding
    tpr·m to 9 decimals, so 0.95 · 20 gives 19 whatever the float error."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    a, b = _two_sets(in_scores, out_scores)
    k = max(1, math.ceil(round(tpr * b.size, 9)))
    threshold = np.sort(b)[b.size - k]  # the k-th largest
    return float(np.count_nonzero(a >= threshold) / a.size)


def ood_metrics(in_scores, out_scores) -> dict[str, float]:
    """{"auroc", "aupr", "fpr95"} of one score."""
    return {
        "auroc": auroc(in_scores, out_scores),
        "aupr": aupr(in_scores, out_scores),
        "fpr95": fpr_at_tpr(in_scores, out_scores, 0.95),
    }


# ----------------------------------------------------------------------------------------------
# Input complexity (Serrà et al. 2020): the length of a lossless PNG code
# ----------------------------------------------------------------------------------------------


def _images_np(images) -> np.ndarray:
    """uint8 (N, H, W) from a tensor or array of shape (N, 1, H, W) or (N, H, W)."""
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 1, H, W), got {arr.dtype} {arr.shape}")
    return arr


def png_encode(image: np.ndarray) -> bytes:
    """One (H, W) uint8 image as a complete 8-bit grayscale PNG file, zlib level 9, no extra chunks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def png_decode(data: bytes) -> np.ndarray:
    """The inverse of ``png_encode``: the PNG file's pixels as a uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def complexity_bpd(images) -> np.ndarray:
    """Each image's complexity L(x) in bits per dimension under a lossless compressor, PNG, as in
    Serrà et al. 2020 ("Input complexity and out-of-distribution detection with likelihood-based
    generative models", ICLR):

        L(x) = 8 · len(png_encode(x)) / D

    counting the whole PNG file: the 8-byte signature, the IHDR chunk (25 bytes), one IDAT chunk
    (12 bytes of length, type and CRC around the zlib stream: 2-byte header, deflate data, 4-byte
    Adler-32) and IEND (12 bytes), over the D = H · W pixels. The 57 bytes of framing (0.58 bpd at
    28x28) are the same for every image of a size, so they shift L and S but change no ranking or
    metric. The code is lossless (``png_decode``
    returns the image exactly). Lengths can differ by a few bytes between zlib builds: compare
    scores from one installation. Returns float64 (N,)."""
    arr = _images_np(images)
    return np.array([8.0 * len(png_encode(img)) / img.size for img in arr], dtype=np.float64)


def corrected_score(bpd, complexity) -> np.ndarray:
    """Serrà et al. 2020's complexity-corrected score, in bits per dimension:

        S(x) = bpd(x) − L(x) = (−log2 p_model(x) − ℓ_PNG(x)) / D

    a log-likelihood ratio of the compressor (a generic "universal" model of images) against the
    model: large when the model explains x worse than a generic compressor does, i.e. OOD. It
    removes the bias of raw likelihoods toward simple images (which any model finds likely)."""
    return np.asarray(bpd, dtype=np.float64) - np.asarray(complexity, dtype=np.float64)


def score_images(
    model: FlowModel, images: Tensor, k: int = 8, batch_size: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-image scores of uint8 images (N, 1, H, W) of the model's size, float64 arrays (N,):
    "bpd" (importance-weighted over k dequantization samples, ``evaluate.image_bpd``: seeded, the
    same values for the same images, order, batch size and seed), "complexity_bpd" (L) and
    "corrected" (S = bpd − L)."""
    bpd = image_bpd(model, images, k, batch_size, seed)[0].numpy()
    complexity = complexity_bpd(images)
    return {"bpd": bpd, "complexity_bpd": complexity, "corrected": corrected_score(bpd, complexity)}


# ----------------------------------------------------------------------------------------------
# Typicality (Nalisnick et al. 2019): is a batch's mean bpd near the model's entropy?
# ----------------------------------------------------------------------------------------------


def typicality_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, scored) indices of an in-distribution set of n images: a seeded permutation, the
    first ⌊n/2⌋ estimate the entropy Ĥ, the other ⌈n/2⌉ are scored (each part in ascending order).
    Disjoint: an image inside Ĥ's estimate would pull its own batch's statistic toward 0."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def typicality_entropy(reference_bpd) -> float:
    """Ĥ = (1/N) Σ_n bpd(x_n) over held-out in-distribution images: the model's entropy estimate
    (Nalisnick et al. 2019's Ĥ = −(1/N) Σ log p(x_n), here in bits per dimension)."""
    ref = np.asarray(reference_bpd, dtype=np.float64)
    if ref.size == 0:
        raise FlowmnistError("the typicality test needs at least 2 in-distribution images (one to estimate Ĥ)")
    return float(ref.mean())


def typicality_scores(bpd, entropy: float, m: int) -> np.ndarray:
    """Nalisnick et al. 2019 ("Detecting out-of-distribution inputs to deep generative models using
    typicality"): for consecutive batches of m images (batch b holds images b·m … b·m + m − 1; the
    last len % m images are dropped)

        T(batch) = | (1/m) Σ_{x ∈ batch} bpd(x) − Ĥ |

    the distance of the batch's mean bpd from the entropy estimate: atypical batches, whether less
    or more likely than typical in-distribution ones, score high. Returns (len // m,)."""
    bpd = np.asarray(bpd, dtype=np.float64)
    nb = bpd.size // m
    return np.abs(bpd[: nb * m].reshape(nb, m).mean(axis=1) - entropy)


def ood_scores(
    inside: dict[str, np.ndarray],
    outside: dict[str, np.ndarray],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float | int]]:
    """Every OOD score of an in-distribution and an OOD set scored by ``score_images``:
    ({name: in-distribution values}, {name: OOD values}, typicality info). Names: "bpd",
    "corrected" (the complexity-corrected score S) and "typicality-M" for each M in ``batch_sizes``. For
    typicality the in-distribution set is split by ``typicality_split(n, seed)``: one half
    estimates Ĥ, the other half is scored; the OOD set is scored whole."""
    ins = {"bpd": inside["bpd"], "corrected": inside["corrected"]}
    outs = {"bpd": outside["bpd"], "corrected": outside["corrected"]}
    ref, scored = typicality_split(len(inside["bpd"]), seed)
    entropy = typicality_entropy(inside["bpd"][ref])
    for m in batch_sizes:
        if min(len(scored), len(outside["bpd"])) < m:
            raise FlowmnistError(
                f"typicality batch size {m} needs at least {m} scored images in each set (in-distribution: "
                f"{len(scored)}, the other {len(ref)} estimate Ĥ; OOD: {len(outside['bpd'])})"
            )
        ins[f"typicality-{m}"] = typicality_scores(inside["bpd"][scored], entropy, m)
        outs[f"typicality-{m}"] = typicality_scores(outside["bpd"], entropy, m)
    info = {"entropy_bpd": entropy, "reference_images": len(ref), "scored_in_images": len(scored)}
    return ins, outs, info


def compare(
    model: FlowModel, in_images: Tensor, ood_images: Tensor, k: int = 8, batch_sizes: Sequence[int] = BATCH_SIZES
) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score two sets of uint8 images with ``model`` and measure every OOD score on them: (summary,
    in-distribution scores, OOD scores). The summary is `flowmnist ood`'s JSON without the data
    sources: {"scores": {NAME: {"auroc", "aupr", "fpr95"}}, "in"/"ood": {"images", "mean_bpd"},
    "importance_samples", "typicality"}; a non-finite value is null."""
    scored = {"in": score_images(model, in_images, k), "ood": score_images(model, ood_images, k)}
    ins, outs, info = ood_scores(scored["in"], scored["ood"], list(dict.fromkeys(batch_sizes)))
    metrics = {name: ood_metrics(ins[name], outs[name]) for name in ins}
    r: dict = {"scores": {name: {m: rounded(v) for m, v in ms.items()} for name, ms in metrics.items()}}
    for key, s in scored.items():
        r[key] = {"images": len(s["bpd"]), "mean_bpd": rounded(s["bpd"].mean())}
    r["importance_samples"] = k
    r["typicality"] = {key: rounded(v) if isinstance(v, float) else v for key, v in info.items()}
    return r, ins, outs


def scores_rows(scores: dict[str, dict[str, float | None]], digits: int | None = 4) -> Table:
    """``compare``'s metrics, a row per score; ``digits`` None: the values as stored (6 decimals, ``rounded``)."""
    rows = [
        [name, *(str(m[k] if digits is None else f"{m[k]:.{digits}f}") for k in ("auroc", "aupr", "fpr95"))]
        for name, m in scores.items()
    ]
    return Table(["score", "AUROC", "AUPR", "FPR95"], rows, [False, True, True, True])


def scores_table(scores: dict[str, dict[str, float | None]], digits: int | None = 4) -> str:
    """``scores_rows`` as Markdown."""
    return scores_rows(scores, digits).markdown()


def rounded(v) -> float | None:
    """A score for CSV and JSON: 6 decimals, or None (empty in CSV, null in JSON) when not finite: a NaN
    is shown, never averaged away."""
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None
