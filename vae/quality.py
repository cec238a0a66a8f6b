"""Sample-quality scores: an in-project feature space (no downloaded weights, any image size), and Inception FID/KID
when the user supplies the Inception weights.

In-project scores. The Fréchet Inception Distance (Heusel et al., NeurIPS 2017) and improved precision/recall
(Kynkäänniemi et al., NeurIPS 2019) need features in which real images cluster. Inception weights are a download and
their 299×299 ImageNet features say little about 16×16 digits, so we train a small CNN on the dataset itself and use
its penultimate layer:
  fd_vaepipe  d² = ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^{1/2}) between Gaussian fits of these features
              (`vae.metrics.frechet_distance`). It is a Fréchet distance in vaepipe's own feature space, NOT FID:
              its values are not comparable with any published FID;
  precision = share of fake features inside the union of real k-NN balls, recall the converse (`vae.metrics`);
  mean_max_prob = mean over fake images of max_c softmax(logits)_c, the classifier's confidence (a cheap proxy of
  the Inception Score's "each sample looks like one class").
Scores are only comparable between runs that share the same trained extractor (its seed, data and recipe): save it
with `SampleQuality.state()` and rebuild it with `SampleQuality.from_state` instead of training it again.

A plain classifier maps every input onto some class region, so structureless images land inside the real k-NN
manifold: on digits 16×16, uniform noise scored precision 0.85 in such features. The CNN therefore learns one extra
class, "structureless": copies of its training images with their pixel positions shuffled (the same intensities,
no spatial structure). With it uniform noise scored precision 0.007, and accuracy on the digit classes stayed 97 %.
The test corruptions (uniform noise, blur) are not the training negatives. Training batches are twice as large.

Label-free data: the fallback trains the same CNN on rotation prediction (RotNet; Gidaris, Singh & Komodakis, ICLR
2018): each image is turned by 0, 90, 180 or 270 degrees and the CNN predicts which. Telling the rotations apart needs
the orientation cues of the data's strokes and parts, so the features are data-specific and degrade on noise or blur,
whereas random-projection features weigh every pixel direction alike and barely separate blur from structure.
mean_max_prob is then the confidence in the rotation of the images as given (high for upright data).

Inception FID and KID (`InceptionScores`): the 2048-d pool features of the Inception-v3 port that torch-fidelity
maintains (the TensorFlow FID graph, bit-exact resizing), the Fréchet distance of their Gaussian fits (FID) and the
kernel inception distance (Bińkowski et al., ICLR 2018: unbiased MMD² with the cubic polynomial kernel, averaged over
random subsets). Both by torch-fidelity's own functions. The weights file is never downloaded here: the caller
passes its path, and a missing file is an error naming the file and where it comes from. Published FIDs use 50k
samples against the training set; fewer samples bias FID upwards, so state the count with the figure.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.metrics import frechet_distance, precision_recall

ROTATIONS = 4  # 0, 90, 180, 270 degrees
# Bumped whenever FeatureCNN or its training changes: an extractor saved under another version is a different feature
# space, and a cache keyed by data must not hand it out.
EXTRACTOR_VERSION = 2
# The training recipe of `SampleQuality.fit` when the caller passes none; part of an extractor's identity.
DEFAULT_RECIPE: dict[str, Any] = {
    "epochs": 15, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "width": 32, "feature_dim": 64,
    "val_fraction": 0.1, "seed": 0, "negatives": "shuffle", "stretch": False,
}
# The judge of samples (`SampleQuality.judge`): another network, its own seed and width, trained on the labels with a
# stricter "not one of the classes" class (pixel-shuffled images and blends of 2-6 training images of different
# classes), on contrast-stretched images, half of its real images blurred, so that it judges shapes, not brightness
# or sharpness. It never defines a score that selects or tunes anything, so it stays an independent witness of what
# the samples look like.
JUDGE_RECIPE: dict[str, Any] = {
    "width": 16, "feature_dim": 32, "seed": 1, "epochs": 20, "negatives": "shuffle+blend", "stretch": True,
}
NEGATIVES = ("shuffle", "shuffle+blend")
JUDGE_CONFIDENT = 0.9  # a sample is "recognised" when the judge puts at least this probability on one class


class FeatureCNN(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> logits (B, num_classes + 1), the last one the "structureless" class;
    `features` is the penultimate layer (B, feature_dim).

    conv3×3-BN-ReLU at full size, then stride-2 stages (channels ×2, capped at 4·width) down to at most 4×4, a global
    mean pool and a ReLU feature layer. With `stretch`, each image's values are first stretched to span [0, 1], so
    that only its shape counts, not its brightness or contrast.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, width: int = 32, feature_dim: int = 64,
        stretch: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.stretch = bool(stretch)
        c, h, w = self.image_shape
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        ch, side = width, min(h, w)
        while side > 4:
            out = min(2 * ch, 4 * width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            ch, side = out, (side + 1) // 2
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(ch, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes + 1)

    def features(self, x: Tensor) -> Tensor:
        if self.stretch:
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-3)
        return self.feature(self.body(2.0 * x - 1.0).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_images(name: str, images: Tensor, shape: tuple[int, int, int] | None = None) -> None:
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(
            f"{name}: expected float images (N, C, H, W) in [0, 1], got {getattr(images, 'dtype', type(images))} of "
            f"shape {tuple(getattr(images, 'shape', ()))}; convert uint8 images with x.float() / 255"
        )
    if shape is not None and tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"{name}: images of shape {tuple(images.shape[1:])}, the feature extractor was trained on {shape}; resize "
            "them or train an extractor on data of this shape"
        )


def _rotate(x: Tensor, turns: Tensor) -> Tensor:
    """Turn image i by turns[i]·90° counter-clockwise."""
    out = x.clone()
    for t in range(1, ROTATIONS):
        rows = turns == t
        if rows.any():
            out[rows] = torch.rot90(x[rows], t, dims=(2, 3))
    return out


def _blends(pool: Tensor, labels: Tensor | None, n: int, generator: torch.Generator) -> Tensor:
    """n images, each the plain average of 2-6 images of `pool` of as many different classes (any images without
    labels): the grey blob of the data's mean shape that a model ignoring its latents draws, which pixel-shuffling
    alone never shows. Averages within one class stay out: a blurred 2 is still a 2."""
    k = torch.randint(2, 7, (n, 1), generator=generator)
    if labels is None:
        picks = torch.randint(0, len(pool), (n, 6), generator=generator)
    else:
        order = labels.argsort()
        counts = torch.bincount(labels)
        starts = counts.cumsum(0) - counts
        present = (counts > 0).nonzero().squeeze(1)
        classes = present[torch.rand(n, len(present), generator=generator).argsort(dim=1)[:, :6]]
        k = k.clamp(max=classes.shape[1])
        within = (torch.rand(classes.shape, generator=generator) * counts[classes]).long()
        picks = order[starts[classes] + within]
    weights = (torch.arange(picks.shape[1])[None] < k).float() / k
    return torch.einsum("nk,nkchw->nchw", weights.to(pool), pool[picks.to(pool.device)])


def _blur_some(x: Tensor, generator: torch.Generator, max_sigma: float = 1.5) -> Tensor:
    """Half of the images (at random) blurred by a Gaussian of σ uniform in [0.3, max_sigma] pixels, each its own."""
    n = len(x)
    sigma = 0.3 + (max_sigma - 0.3) * torch.rand(n, generator=generator)
    keep = torch.rand(n, generator=generator) < 0.5
    radius = int(math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x)  # (n, K): one separable kernel per image
    b, c, h, w = x.shape
    flat = x.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # (n·c, K)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    blurred = flat.reshape(b, c, h, w)
    return torch.where(keep.to(x.device)[:, None, None, None], x, blurred)


def _shuffle_pixels(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image with its pixel positions permuted at random (colours stay whole): the "structureless" class."""
    b, c, h, w = x.shape
    order = torch.rand(b, h * w, generator=generator).argsort(dim=1).to(x.device)
    return x.flatten(2).gather(2, order.unsqueeze(1).expand(b, c, h * w)).view_as(x)


def train_feature_classifier(
    images: Tensor,
    labels: Tensor | None,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    feature_dim: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    negatives: str = "shuffle",
    stretch: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[FeatureCNN, dict[str, Any]]:
    """Train a FeatureCNN on images (N, C, H, W) in [0, 1] (on their device) with class labels (N,), or, with
    labels=None, on rotation prediction; every batch also holds its pixel-shuffled copies as the structureless class
    (`negatives="shuffle"`), and with "shuffle+blend" as many averages of 2-6 training images of different classes
    besides.
    AdamW with a cosine-decayed learning rate; seeded by `seed` without touching the global RNG.

    Returns the model (eval mode) and its history: per epoch "train_loss" and "val_accuracy" (data classes only) on a
    held-out `val_fraction` of the images, and "task" ("labels" or "rotation"). After each epoch
    `progress({"epoch", "epochs", "train_loss", "val_accuracy", "seconds"})` hears how far it got (`seconds` since the
    start), so a caller can show an ETA.
    """
    _check_images("images", images)
    n = images.shape[0]
    n_val = int(round(val_fraction * n))
    if not 0.0 <= val_fraction < 1.0 or n - n_val < 2:
        raise ValueError(
            f"val_fraction={val_fraction} leaves {n - n_val} of {n} images to train on; use a value in [0, 1)"
        )
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"epochs={epochs} must be >= 1 and batch_size={batch_size} >= 2 (batch norm needs 2 rows)")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives={negatives!r} is not one of {', '.join(NEGATIVES)}")
    if labels is None:
        if images.shape[2] != images.shape[3]:
            raise ValueError(
                "rotation features need square images (a 90° turn must keep the shape), got "
                f"{tuple(images.shape[2:])}; pad or crop the images, or pass labels"
            )
        num_classes = ROTATIONS
    else:
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels; pass one label per image")
        if labels.min() < 0 or len(labels.unique()) < 2:
            raise ValueError(
                "labels must be class indices >= 0 with at least two classes; pass labels=None for rotations"
            )
        num_classes = int(labels.max()) + 1
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    val_idx, train_idx = order[:n_val], order[n_val:]
    history: dict[str, Any] = {"epoch": [], "train_loss": [], "val_accuracy": []}
    pool = images[train_idx] if negatives == "shuffle+blend" else None
    pool_labels = labels[train_idx] if pool is not None and labels is not None else None
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = FeatureCNN(images.shape[1:], num_classes, width, feature_dim, stretch).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        total_steps = epochs * math.ceil(len(train_idx) / batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for rows in torch.randperm(len(train_idx), generator=generator).split(batch_size):
                if len(rows) < 2:
                    continue  # a one-row batch has no batch statistics
                idx = train_idx[rows]
                x = images[idx]
                if labels is None:
                    y = torch.randint(0, ROTATIONS, (len(idx),), generator=generator)
                    x = _rotate(x, y.to(device))
                else:
                    y = labels[idx]
                fakes = [_shuffle_pixels(x, generator)]
                if negatives == "shuffle+blend":
                    fakes.append(_blends(pool, pool_labels, len(idx), generator))
                    x = _blur_some(x, generator)  # blur alone never makes a non-digit: only the blends' overlaps do
                x = torch.cat([x, *fakes])
                y = torch.cat([y, *[torch.full_like(y, num_classes)] * len(fakes)]).to(device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
            history["epoch"].append(epoch + 1)
            history["train_loss"].append(total / max(count, 1))
            val_labels = None if labels is None else labels[val_idx]
            history["val_accuracy"].append(_accuracy(model, images[val_idx], val_labels))
            if progress is not None:
                progress({"epoch": epoch + 1, "epochs": epochs, "train_loss": history["train_loss"][-1],
                          "val_accuracy": history["val_accuracy"][-1], "seconds": time.perf_counter() - started})
    model.eval()
    history["task"] = "rotation" if labels is None else "labels"
    return model, history


@torch.no_grad()
def _accuracy(model: FeatureCNN, images: Tensor, labels: Tensor | None) -> float:
    """Held-out accuracy over the data classes (the structureless class is not a candidate); for rotations every
    image is scored at all four turns. NaN without held-out images."""
    if len(images) == 0:
        return math.nan
    model.eval()
    if labels is None:
        turns = torch.arange(ROTATIONS).repeat_interleave(len(images))
        images, labels = _rotate(images.repeat(ROTATIONS, 1, 1, 1), turns.to(images.device)), turns
    correct = sum(
        (model(x)[:, :-1].argmax(1).cpu() == y).sum().item() for x, y in zip(images.split(512), labels.split(512))
    )
    return correct / len(labels)


class SampleQuality(nn.Module):
    """Sample-quality scores in the feature space of a trained FeatureCNN. Picklable; `.to(device)` moves it."""

    def __init__(self, classifier: FeatureCNN, task: Literal["labels", "rotation"] = "labels") -> None:
        super().__init__()
        if task not in ("labels", "rotation"):
            raise ValueError(f"SampleQuality: task {task!r} is not 'labels' or 'rotation'")
        self.classifier = classifier.eval()
        self.classifier.requires_grad_(False)
        self.task = task
        self.history: dict[str, Any] = {}  # the training history when built by `fit`
        self.recipe: dict[str, Any] = {}  # the training arguments when built by `fit`

    @classmethod
    def fit(
        cls,
        images: Tensor,
        labels: Tensor | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        **recipe: Any,
    ) -> "SampleQuality":
        """Train the extractor on `images` (with labels, or on rotations without) and wrap it. `recipe` overrides
        DEFAULT_RECIPE (the keyword arguments of `train_feature_classifier`); `progress` hears every epoch."""
        unknown = sorted(set(recipe) - set(DEFAULT_RECIPE))
        if unknown:
            raise ValueError(f"SampleQuality.fit: unknown recipe keys {unknown}; known: {sorted(DEFAULT_RECIPE)}")
        recipe = {**DEFAULT_RECIPE, **recipe}
        classifier, history = train_feature_classifier(images, labels, progress=progress, **recipe)
        quality = cls(classifier, history["task"])
        quality.history, quality.recipe = history, recipe
        return quality

    def state(self) -> dict[str, Any]:
        """Everything that defines this feature space, as plain tensors and numbers (torch.save it; it loads back
        with `torch.load(..., weights_only=True)` and `from_state`)."""
        clf = self.classifier
        return {
            "version": EXTRACTOR_VERSION, "task": self.task, "image_shape": list(clf.image_shape),
            "num_classes": clf.num_classes, "width": clf.body[0].out_channels,
            "feature_dim": clf.feature[0].out_features, "stretch": clf.stretch, "recipe": dict(self.recipe), "history": dict(self.history),
            "state_dict": {k: v.detach().cpu() for k, v in clf.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SampleQuality":
        """The extractor saved by `state()`; refuses one saved by another version of this module."""
        if state.get("version") != EXTRACTOR_VERSION:
            raise ValueError(
                f"SampleQuality.from_state: the saved extractor is version {state.get('version')}, this code builds "
                f"version {EXTRACTOR_VERSION} (a different feature space); train a new one with SampleQuality.fit"
            )
        clf = FeatureCNN(tuple(state["image_shape"]), state["num_classes"], state["width"], state["feature_dim"],
                         bool(state.get("stretch", False)))
        clf.load_state_dict(state["state_dict"])
        quality = cls(clf, state["task"])
        quality.history, quality.recipe = dict(state.get("history", {})), dict(state.get("recipe", {}))
        return quality

    def train(self, mode: bool = True) -> "SampleQuality":
        # The extractor's BN statistics define the feature space; they must never follow the scored images.
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def _outputs(self, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        _check_images("images", images, self.classifier.image_shape)
        device = next(self.classifier.parameters()).device
        feats, probs = [], []
        for x in images.split(batch_size):
            f = self.classifier.features(x.to(device).float())
            feats.append(f.cpu())
            probs.append(torch.softmax(self.classifier.head(f), dim=1).cpu())
        return torch.cat(feats), torch.cat(probs)

    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """(N, feature_dim) float32 on the CPU: the penultimate layer for images (N, C, H, W) in [0, 1]."""
        return self._outputs(images, batch_size)[0]

    def probabilities(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """(N, num_classes + 1) softmax of the classifier: the classes (or the four rotations), then structureless."""
        return self._outputs(images, batch_size)[1]

    def score(self, real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
        """{"fd_vaepipe", "precision", "recall", "mean_max_prob"} of `fake` against `real`, both (N, C, H, W) in
        [0, 1].

        fd_vaepipe (the Fréchet distance in these features, not FID) and the k-NN precision/recall use the features; mean_max_prob is the mean over the fake images of the top
        softmax among the data classes (mass on "structureless" counts against it).
        Both sets need more than k images (and the covariances are noisy below a few hundred).
        """
        f_real = self.features(real)
        f_fake, p_fake = self._outputs(fake, 512)
        precision, recall = precision_recall(f_real, f_fake, k=k)
        return {
            "fd_vaepipe": frechet_distance(f_real, f_fake),
            "precision": precision,
            "recall": recall,
            "mean_max_prob": p_fake[:, :-1].max(dim=1).values.mean().item(),
        }

    def judge(self, fake: Tensor) -> dict[str, float]:
        """What a classifier trained on the labelled data says of images (N, C, H, W) in [0, 1]:
        - "judge_confidence": the mean over images of the top class probability (mass on "not a class" counts
          against it);
        - "judge_recognised": the share of images whose top class probability is at least JUDGE_CONFIDENT (0.9);
        - "judge_class_entropy": the entropy of the recognised images' classes over log(number of classes): 1 when
          every class is drawn equally often, 0 when all are one class (samples with no variety), NaN when none is
          recognised.
        Meant for a SampleQuality fitted with JUDGE_RECIPE on labels; score real images the same way for the ceiling.
        """
        if self.task != "labels":
            raise ValueError("SampleQuality.judge needs a classifier of labels; this one predicts rotations (the data "
                             "had no labels), so its confidence says nothing about classes")
        top = self.probabilities(fake)[:, :-1].max(dim=1)
        recognised = top.values >= JUDGE_CONFIDENT
        counts = torch.bincount(top.indices[recognised], minlength=self.classifier.num_classes).float()
        share = counts / counts.sum().clamp_min(1.0)
        entropy = -(share * share.clamp_min(1e-12).log()).sum() / math.log(self.classifier.num_classes)
        return {
            "judge_confidence": top.values.mean().item(),
            "judge_recognised": recognised.float().mean().item(),
            "judge_class_entropy": entropy.item() if recognised.any() else math.nan,
        }


# ----------------------------------------------------------------------------------------------------------------
# Inception FID and KID, through torch-fidelity, from a weights file the user supplies.

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
_INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's registered name of the FID network
_POOL = "2048"  # the pool features FID and KID are defined on


def inception_weights_help(where: str = "") -> str:
    """How to obtain the weights file; `where` names the setting that takes its path."""
    take = where or "the path of that file"
    return (
        f"Inception FID/KID needs torch-fidelity's Inception-v3 weights, the file {INCEPTION_WEIGHTS_FILE} (the "
        f"TensorFlow FID network converted to PyTorch; {INCEPTION_WEIGHTS_URL}). vaepipe never downloads it: fetch it "
        f"once where there is network access, copy it next to your runs (e.g. runs/weights/{INCEPTION_WEIGHTS_FILE}) "
        f"or log it as an MLflow artifact, and pass {take}"
    )


def _torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
    except ImportError as e:
        raise ImportError(
            f"Inception FID/KID needs the torch-fidelity package ({e}); install it with `pip install torch-fidelity`"
        ) from None
    return FeatureExtractorInceptionV3, fid_features_to_statistics, fid_statistics_to_metric, kid_features_to_metric


class InceptionScores:
    """FID and KID of image sets in Inception-v3 pool features, computed by torch-fidelity.

    `weights_path` is a local file of torch-fidelity's Inception-v3 state dict (INCEPTION_WEIGHTS_FILE); it is loaded
    strictly, so a file of another architecture is refused. Images are (N, C, H, W) floats in [0, 1] with 1 or 3
    channels; they are quantised to uint8 as an image file would be, grey images repeated to RGB, and resized to
    299×299 inside the network.
    """

    def __init__(self, weights_path: str, device: str | torch.device = "cpu", batch_size: int = 64,
                 where: str = "") -> None:
        import os

        extractor_cls, self._fid_stats, self._fid_metric, self._kid_metric = _torch_fidelity()
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no Inception weights at {path!r}. {inception_weights_help(where)}")
        try:
            self.extractor = extractor_cls(_INCEPTION_NAME, [_POOL], feature_extractor_weights_path=path)
        except RuntimeError as e:  # load_state_dict(strict=True): keys or shapes of another network
            raise ValueError(
                f"{path!r} is not torch-fidelity's Inception-v3 state dict ({str(e).splitlines()[0][:160]}). "
                f"{inception_weights_help(where)}"
            ) from None
        self.device = torch.device(device)
        self.extractor.to(self.device)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def features(self, images: Tensor, progress: Callable[[int, int], None] | None = None) -> Tensor:
        """(N, 2048) float32 on the CPU; `progress(done, total)` hears every batch (299×299 passes are slow on a CPU)."""
        _check_images("images", images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images: Inception reads grey or RGB images, got {images.shape[1]} channels")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start:start + self.batch_size]
            x = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(self.extractor(x.to(self.device))[0].float().cpu())
            if progress is not None:
                progress(min(start + self.batch_size, len(images)), len(images))
        return torch.cat(out)

    def score_features(self, real: Tensor, fake: Tensor, kid_subsets: int = 100, seed: int = 0) -> dict[str, float]:
        """{"fid", "kid", "kid_std"} from pool features (N_r, 2048), (N_f, 2048). KID averages `kid_subsets` random
        subsets of min(1000, N_r, N_f) rows each (torch-fidelity's defaults; fewer rows with small sets)."""
        if len(real) < 2 or len(fake) < 2:
            raise ValueError(f"FID/KID need >= 2 images per set, got {len(real)} and {len(fake)}")
        fid = self._fid_metric(self._fid_stats(real.double()), self._fid_stats(fake.double()), False)
        kid = self._kid_metric(real, fake, kid_subsets=kid_subsets, kid_subset_size=min(1000, len(real), len(fake)),
                               verbose=False, rng_seed=seed)
        return {"fid": max(float(fid["frechet_inception_distance"]), 0.0),
                "kid": float(kid["kernel_inception_distance_mean"]),
                "kid_std": float(kid["kernel_inception_distance_std"])}

    def score(self, real: Tensor, fake: Tensor) -> dict[str, float]:
        """{"fid", "kid", "kid_std"} of `fake` against `real`, both (N, C, H, W) in [0, 1]."""
        return self.score_features(self.features(real), self.features(fake))
