"""vae.quality on scikit-learn's digits at 16×16: the in-project feature classifier learns the digits, and its scores
order real, blurred, noise and mode-collapsed sample sets the way sample quality should be ordered; the extractor
saves and loads back as the same feature space; Inception FID/KID run through torch-fidelity on a weights file of the
right architecture (randomly initialised here: the real one is never downloaded)."""
from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from vae.quality import (
    EXTRACTOR_VERSION,
    INCEPTION_WEIGHTS_FILE,
    JUDGE_RECIPE,
    FeatureCNN,
    InceptionScores,
    SampleQuality,
    train_feature_classifier,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for these tiny CNNs: on the shared 2-core machine two threads spin against the other
    engineers' jobs and run many times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """(1797, 1, 16, 16) in [0, 1] (bilinear ×2 of value/16) and labels, split 1200 train / 597 test (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    return (x[train], y[train]), (x[test], y[test])


@pytest.fixture(scope="module")
def labelled(digits):
    (x, y), _ = digits
    return SampleQuality.fit(x, y, width=16, epochs=15, seed=1)


@pytest.fixture(scope="module")
def sets(digits):
    """Real images split in two halves, and fakes: uniform noise, blurred real images, and only the digit 0."""
    _, (x, y) = digits
    real, other = x[:300], x[300:]
    g = torch.Generator().manual_seed(2)
    return {
        "real": real,
        "other": other,
        "noise": torch.rand(other.shape, generator=g),
        "blur": gaussian_blur(other, kernel_size=5, sigma=1.5),
        "zeros": x[y == 0],
    }


def test_classifier_learns_the_digits(labelled, digits):
    _, (x_test, y_test) = digits
    assert labelled.task == "labels"
    assert labelled.history["val_accuracy"][-1] > 0.9
    probs = labelled.probabilities(x_test)
    assert probs.shape == (len(x_test), 11)  # ten digits and the structureless class
    assert torch.allclose(probs.sum(1), torch.ones(len(x_test)), atol=1e-5)
    accuracy = (probs[:, :10].argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.93  # chance is 0.1


def test_frechet_distance_separates_real_from_noise_and_blur(labelled, sets):
    score = {name: labelled.score(sets["real"], sets[name]) for name in ("other", "noise", "blur", "zeros")}
    assert all("fid" not in key for key in score["other"])  # its own feature space: never called FID
    fd = {name: s["fd_vaepipe"] for name, s in score.items()}
    assert labelled.score(sets["real"], sets["real"])["fd_vaepipe"] == pytest.approx(0.0, abs=1e-6)
    assert fd["other"] < fd["noise"] / 20
    assert fd["other"] < fd["blur"] / 10
    assert fd["other"] < fd["zeros"] / 20  # one class only is far from the data's mixture of ten


def test_precision_recall_behave(labelled, sets):
    real = labelled.score(sets["real"], sets["other"])
    noise = labelled.score(sets["real"], sets["noise"])
    blur = labelled.score(sets["real"], sets["blur"])
    collapsed = labelled.score(sets["real"], sets["zeros"])
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert blur["precision"] < real["precision"] - 0.2
    # Mode collapse: every sample is a good digit (high precision), most of the data is not covered (low recall).
    assert collapsed["precision"] > 0.8 and collapsed["recall"] < 0.3


def test_mean_max_prob_higher_for_real_than_noise(labelled, sets):
    real = labelled.score(sets["real"], sets["other"])["mean_max_prob"]
    noise = labelled.score(sets["real"], sets["noise"])["mean_max_prob"]
    assert real > 0.75 and noise < real - 0.5


def test_the_judge_recognises_digits_and_refuses_blobs_noise_and_one_class(digits, sets):
    """The judge of samples: real held-out digits are recognised (p >= 0.9) and spread over the ten classes; the
    average of four held-out digits (a grey blob of the data's mean shape, what a model that ignores its latents
    draws: not the judge's own training blends) and uniform noise are not; one class only has no variety."""
    (x, y), _ = digits
    judge = SampleQuality.fit(x, y, **JUDGE_RECIPE)
    real = judge.judge(sets["other"])
    g = torch.Generator().manual_seed(5)
    blobs = sets["other"][torch.randint(0, len(sets["other"]), (200, 4), generator=g)].mean(dim=1)
    blob, noise, zeros = judge.judge(blobs), judge.judge(sets["noise"]), judge.judge(sets["zeros"])
    assert real["judge_recognised"] > 0.7 and real["judge_confidence"] > 0.85, real  # 0.80 and 0.92 seen
    assert real["judge_class_entropy"] > 0.95, real
    assert blob["judge_recognised"] < 0.15 and blob["judge_confidence"] < real["judge_confidence"] - 0.4, blob
    assert noise["judge_recognised"] < 0.05, noise
    assert judge.judge(sets["blur"])["judge_recognised"] > 0.5  # a blurred digit is still that digit
    assert zeros["judge_recognised"] > 0.8 and zeros["judge_class_entropy"] < 0.1, zeros
    # A blurred digit is still that digit: averages of three 0s, dimmed to half their brightness, are recognised.
    dim_zeros = 0.5 * sets["zeros"][torch.randint(0, len(sets["zeros"]), (100, 3), generator=g)].mean(dim=1)
    assert judge.judge(dim_zeros)["judge_recognised"] > 0.6
    rotations = SampleQuality.fit(x[:200], None, width=8, epochs=1, seed=3)
    with pytest.raises(ValueError, match="rotations"):
        rotations.judge(sets["other"])


def test_rotation_fallback_without_labels(digits, sets):
    (x, _), _ = digits
    quality = SampleQuality.fit(x, None, width=16, epochs=10, seed=3)
    assert quality.task == "rotation" and quality.history["task"] == "rotation"
    assert quality.history["val_accuracy"][-1] > 0.7  # four rotations: chance is 0.25 (0, 1 and 8 are symmetric-ish)
    real = quality.score(sets["real"], sets["other"])
    noise = quality.score(sets["real"], sets["noise"])
    blur = quality.score(sets["real"], sets["blur"])
    assert real["fd_vaepipe"] < noise["fd_vaepipe"] / 20 and real["fd_vaepipe"] < blur["fd_vaepipe"] / 5
    assert noise["precision"] < 0.1 and real["precision"] > 0.8
    assert real["mean_max_prob"] > noise["mean_max_prob"] + 0.3


def test_features_shape_pickle_and_frozen_statistics(labelled, sets):
    feats = labelled.features(sets["real"][:10])
    assert feats.shape == (10, 64) and feats.dtype == torch.float32
    clone = pickle.loads(pickle.dumps(labelled))
    assert torch.equal(clone.features(sets["real"][:10]), feats)
    labelled.train()  # the extractor's batch norm must keep scoring with its running statistics
    assert labelled.classifier.training is False
    assert torch.equal(labelled.features(sets["real"][:10]), feats)


def test_bad_inputs_name_the_fix(labelled, digits):
    (x, y), _ = digits
    with pytest.raises(ValueError, match="trained on \\(1, 16, 16\\)"):
        labelled.features(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="x.float\\(\\) / 255"):
        labelled.features((x[:4] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="one label per image"):
        train_feature_classifier(x[:100], y[:99])
    with pytest.raises(ValueError, match="square images"):
        train_feature_classifier(torch.rand(20, 1, 16, 8), None)
    with pytest.raises(ValueError, match="at least two classes"):
        train_feature_classifier(x[:50], torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="task"):
        SampleQuality(FeatureCNN((1, 16, 16), 10), task="colour")


def test_state_round_trip_is_the_same_feature_space(labelled, sets, tmp_path):
    path = tmp_path / "extractor.pt"
    torch.save(labelled.state(), path)
    state = torch.load(path, weights_only=True)  # plain tensors and numbers: no pickled code
    clone = SampleQuality.from_state(state)
    assert clone.task == labelled.task and clone.recipe == labelled.recipe and clone.recipe["width"] == 16
    assert torch.equal(clone.features(sets["noise"]), labelled.features(sets["noise"]))
    assert clone.score(sets["real"], sets["blur"]) == labelled.score(sets["real"], sets["blur"])
    with pytest.raises(ValueError, match=f"version {EXTRACTOR_VERSION - 1}.*train a new one"):
        SampleQuality.from_state({**state, "version": EXTRACTOR_VERSION - 1})
    with pytest.raises(ValueError, match="unknown recipe keys \\['epoch'\\]"):
        SampleQuality.fit(sets["real"], None, epoch=3)


def test_training_reports_progress_every_epoch(digits):
    (x, y), _ = digits
    seen = []
    train_feature_classifier(x[:200], y[:200], epochs=3, width=8, progress=seen.append)
    assert [p["epoch"] for p in seen] == [1, 2, 3] and all(p["epochs"] == 3 for p in seen)
    assert all(0.0 <= p["val_accuracy"] <= 1.0 and p["seconds"] > 0 for p in seen)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random (He-initialised) weights, saved like the real checkpoint."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pt")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pt"))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # activations keep their scale
    path = d / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_and_kid_through_torch_fidelity(random_inception, sets):
    """299×299 passes cost about 0.3 s per image on one CPU core: 12 images per set."""
    scorer = InceptionScores(str(random_inception), batch_size=8)
    done = []
    real = scorer.features(sets["real"][:12], progress=lambda d, t: done.append((d, t)))
    assert real.shape == (12, 2048) and done == [(8, 12), (12, 12)]
    other = scorer.features(sets["other"][:12])
    noise = scorer.features(sets["noise"][:12])
    itself = scorer.score_features(real, real)
    assert itself["fid"] == pytest.approx(0.0, abs=1e-6)
    to_real, to_noise = scorer.score_features(real, other), scorer.score_features(real, noise)
    assert to_noise["fid"] > 5 * to_real["fid"] > 0
    assert abs(itself["kid"]) < to_noise["kid"] / 3 and to_noise["kid"] > to_real["kid"]


def test_inception_weights_missing_or_of_another_network_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS_FILE}.*never downloads"):
        InceptionScores(str(tmp_path / "nothing.pth"))
    wrong = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match=f"not torch-fidelity's Inception-v3 state dict.*{INCEPTION_WEIGHTS_FILE}"):
        InceptionScores(str(wrong))
