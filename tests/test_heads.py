"""The softmax head: the fit against independent numpy/scipy computations, the wrapper's
contract, the query firewall, the cache, and the accuracy count against brute force."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crossres.datamodules.synthetic import SyntheticFacesDataModule
from crossres.io import sidecar_path
from crossres.models.base import FaceModel, GalleryClassifier, PretrainedConfig
from crossres.models.heads import (
    HeadClassifier,
    QueryLeakError,
    default_l2,
    fit_softmax,
    fit_softmax_head,
    head_accuracy,
    head_predictions,
    train_head,
)
from crossres.models.templates import compute_templates, gallery_image_features

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvEmbedder(FaceModel):
    """A tiny seeded embedder that counts its passes."""

    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        super().__init__(
            PretrainedConfig(input_size=(3, 24, 24), resize_shortest=None, feature_dim=dim)
        )
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, dim, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(dim, generator=g) * 0.1)
        self.calls = 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x).mean((2, 3))


def datamodule(**kw) -> SyntheticFacesDataModule:
    args = dict(n_identities=6, n_images=4, image_size=24, input_size=24, batch_size=5)
    args.update(kw)
    dm = SyntheticFacesDataModule(**args)
    dm.setup("test")
    return dm


def clusters(k: int, d: int, per_class: list[int], *, seed: int, noise: float = 0.05):
    """Features around k random unit centres in d >= k dimensions (linearly separable)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    centres = q.T  # orthonormal: every class separable from the rest by its own direction
    y = np.repeat(np.arange(k), per_class)
    x = centres[y] + noise * rng.standard_normal((len(y), d)) / np.sqrt(d)
    return torch.from_numpy(x), torch.from_numpy(y)


def numpy_gradient(x, y, w, b, lam):
    """d/d(W, b) of mean CE + lam/2 ||W||^2, from the textbook formula (softmax - one-hot)."""
    x, w, b = (np.asarray(t, dtype=np.float64) for t in (x, w, b))
    z = x @ w.T + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), np.asarray(y)] -= 1.0
    g = p / len(y)
    return g.T @ x + lam * w, g.sum(0)


# ---------------------------------------------------------------------------- the fit


def test_separable_features_are_fitted_exactly_even_with_one_photo_per_class():
    # the default data's shape in small: most classes seen once, a few several times
    x, y = clusters(40, 48, [1] * 34 + [3] * 6, seed=0)
    fit = fit_softmax(x, y)
    assert fit.converged
    assert fit.train_accuracy == 1.0
    logits = x @ fit.weight.T + fit.bias
    assert torch.equal(logits.argmax(1), y)


def test_the_optimum_satisfies_the_kkt_condition_of_an_independent_gradient():
    x, y = clusters(12, 16, [1] * 6 + [4] * 6, seed=1, noise=0.8)  # overlapping: a real trade-off
    fit = fit_softmax(x, y)
    gw, gb = numpy_gradient(x, y.numpy(), fit.weight, fit.bias, fit.l2)
    # the fit stops at max |gradient| <= 1e-6 on unit-RMS features (here rms ~ 1)
    assert max(np.abs(gw).max(), np.abs(gb).max()) < 1e-5
    # ... and the condition is not met trivially: the start point is far from stationary
    gw0, gb0 = numpy_gradient(x, y.numpy(), np.zeros_like(gw), np.zeros_like(gb), fit.l2)
    assert max(np.abs(gw0).max(), np.abs(gb0).max()) > 1e-2
    assert fit.l2 == pytest.approx(float((x * x).sum(1).mean()) / (len(y) * 12), rel=1e-12)


def test_two_runs_give_identical_heads():
    x, y = clusters(10, 12, [2] * 10, seed=2, noise=0.5)
    w1, b1 = fit_softmax_head(x, y)
    w2, b2 = fit_softmax_head(x.clone(), y.clone())
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_two_classes_reduce_to_logistic_regression_minimised_independently():
    """Softmax over 2 classes with penalty lam/2 (|w1|^2 + |w2|^2) is logistic regression on
    w = w1 - w2 with penalty lam/4 |w|^2 (the penalty is least at w1 = -w2 = w/2)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 3)) + np.array([0.5, -0.2, 0.1])
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.7 * rng.standard_normal(60) > 0.3).astype(np.int64)
    lam = 0.05
    # a tight tolerance: this compares optima, not the recipe's stopping point
    fit = fit_softmax(torch.from_numpy(x), torch.from_numpy(y), l2=lam, gtol=1e-9)

    s = 2 * y - 1

    def logistic(theta):
        w, b = theta[:3], theta[3]
        return np.mean(np.logaddexp(0.0, -s * (x @ w + b))) + lam / 4 * w @ w

    ref = scipy.optimize.minimize(
        logistic,
        np.zeros(4),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000},
    )
    w, b = fit.weight.numpy(), fit.bias.numpy()
    # class 1 is the positive one: logit_1 - logit_0 = (w1 - w0) x + (b1 - b0)
    # measured 4e-8 (Nelder-Mead's own precision) and 1e-16
    np.testing.assert_allclose(w[1] - w[0], ref.x[:3], atol=4e-7)
    assert b[1] - b[0] == pytest.approx(ref.x[3], abs=4e-7)
    np.testing.assert_allclose(w[0] + w[1], 0.0, atol=1e-14)
    assert b[0] + b[1] == pytest.approx(0.0, abs=1e-14)


@settings(max_examples=10)
@given(scale=st.floats(1e-2, 1e2), seed=st.integers(0, 1000))
def test_the_default_rule_makes_the_logits_independent_of_the_feature_scale(scale, seed):
    x, y = clusters(5, 6, [3] * 5, seed=seed, noise=1.0)
    # the fit solves on unit-RMS features, so both solve the same problem up to rounding,
    # which can change the path; each stops within max |grad| <= 1e-6 of the optimum
    a = fit_softmax(x, y)
    b = fit_softmax(x * scale, y)
    la, lb = x @ a.weight.T + a.bias, (x * scale) @ b.weight.T + b.bias
    # measured: 1e-14 typically, 8e-12 at worst (scale 3, seed 438)
    torch.testing.assert_close(lb, la, atol=1e-10, rtol=0)


def test_the_softmax_loss_decreases_from_the_start_point():
    x, y = clusters(8, 8, [2] * 8, seed=5, noise=1.5)
    fit = fit_softmax(x, y)

    def loss(w, b):
        z = x.numpy() @ w.T + b
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return np.mean(lse - z[np.arange(len(y)), y.numpy()]) + fit.l2 / 2 * (w * w).sum()

    w, b = fit.weight.numpy(), fit.bias.numpy()
    assert loss(w, b) < loss(np.zeros_like(w), np.zeros_like(b)) - 0.1
    rng = np.random.default_rng(0)
    for _ in range(5):  # a minimum: every small move costs
        dw, db = 1e-3 * rng.standard_normal(w.shape), 1e-3 * rng.standard_normal(b.shape)
        assert loss(w + dw, b + db) >= loss(w, b)


@pytest.mark.parametrize(
    "features, labels, kwargs, match",
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {}, "non-empty"),
        (torch.ones(4, 3), torch.tensor([0, 1, 2]), {}, "labels must be"),
        (torch.ones(3, 3), torch.tensor([0.0, 1.0, 1.0]), {}, "integer"),
        (torch.tensor([[0.0, float("nan")], [1, 1]]), torch.tensor([0, 1]), {}, "NaN"),
        (torch.ones(3, 2), torch.tensor([0, 1, 5]), {"num_classes": 3}, r"\[0, 3\)"),
        (torch.ones(3, 2), torch.tensor([0, 0, 0]), {}, ">= 2 classes"),
        (torch.ones(3, 2), torch.tensor([0, 1, 1]), {"l2": 0.0}, "l2 must be"),
        (torch.zeros(3, 2), torch.tensor([0, 1, 1]), {}, "all zero"),
    ],
)
def test_bad_fit_input_is_named(features, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_softmax(features, labels, **kwargs)


def test_default_l2_is_the_mean_squared_norm_over_n_times_k():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # squared norms 25 and 1
    assert default_l2(x, 5) == pytest.approx(13.0 / (2 * 5))


# ---------------------------------------------------------------------------- the wrapper


def test_head_classifier_is_features_times_weight_plus_bias_in_one_backbone_pass():
    backbone = ConvEmbedder()
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    model = HeadClassifier(backbone, w, b, torch.tensor([7, 2, 5]))
    x = torch.rand(4, 3, 24, 24, generator=g)
    assert model.num_classes == 3
    torch.testing.assert_close(model.features(x), backbone.features(x))
    backbone.calls = 0
    f, logits = model.features_and_logits(x)
    assert backbone.calls == 1
    torch.testing.assert_close(logits, f @ w.T + b)
    torch.testing.assert_close(model(x), logits)
    # dtype and device follow the input; gradients reach the input, nothing of the head trains
    logits64 = model.double()(x.double().requires_grad_(True))
    assert logits64.dtype == torch.float64
    assert list(model.head.parameters()) == []
    xg = x.clone().requires_grad_(True)
    model.float()(xg)[:, 0].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "w, b, ids, match",
    [
        (torch.zeros(3, 8), torch.zeros(2), [0, 1, 2], "bias must be"),
        (torch.zeros(3, 5), torch.zeros(3), [0, 1, 2], "5"),
        (torch.zeros(3, 8), torch.zeros(3), [0, 1], "class_ids has 2"),
        (torch.zeros(3, 8), torch.zeros(3), [0, 1, 1], "unique"),
        (torch.zeros(3, 8), torch.zeros(3), [0.0, 1.0, 2.0], "integer"),
    ],
)
def test_bad_heads_are_refused(w, b, ids, match):
    with pytest.raises(ValueError, match=match):
        HeadClassifier(ConvEmbedder(), w, b, torch.tensor(ids))


# ---------------------------------------------------------------------------- training


def test_gallery_image_features_are_the_features_of_each_gallery_image():
    dm, model = datamodule(), ConvEmbedder()
    feats, ids, sids = gallery_image_features(model, dm.gallery_dataloader())
    ds = dm.gallery_dataset()
    assert len(feats) == len(ds)
    with torch.no_grad():
        for k in range(len(ds)):
            item = ds[k]
            torch.testing.assert_close(feats[k], model.features(item.image[None])[0])
            assert (int(ids[k]), int(sids[k])) == (item.identity, item.sample_id)
    with pytest.raises(ValueError, match="original resolution"):
        gallery_image_features(model, dm.test_dataloader())


def test_train_head_fits_the_gallery_photos_with_the_templates_classes(tmp_path):
    dm, model = datamodule(), ConvEmbedder()
    head = train_head(
        model, dm.gallery_dataloader(), query_ids=dm.query_table.sample_id, cache=False
    )
    feats, ids, _ = gallery_image_features(model, dm.gallery_dataloader())
    classes, labels = torch.unique(ids, return_inverse=True)
    w, b = fit_softmax_head(feats, labels)
    torch.testing.assert_close(head.head.weight, w.float())
    torch.testing.assert_close(head.head.bias, b.float())
    gallery = compute_templates(model, dm.gallery_dataloader(), num_classes=dm.num_classes)
    assert torch.equal(head.class_ids, gallery.ids) and torch.equal(head.class_ids, classes)
    assert head.record["n_train"] == len(dm.gallery_table())
    assert head.record["cached"] is False


def test_a_query_among_the_training_images_is_refused():
    dm, model = datamodule(), ConvEmbedder()
    leaked = [int(dm.query_table.sample_id[0]), int(dm.gallery_table().sample_id[3])]
    with pytest.raises(QueryLeakError, match=str(leaked[1])):
        train_head(model, dm.gallery_dataloader(), query_ids=leaked, cache=False)
    # the whole query set of the test loader as the training set
    with pytest.raises(QueryLeakError, match="never be trained on a query"):
        train_head(
            model,
            dm.gallery_dataloader(),
            query_ids=torch.as_tensor(dm.gallery_table().sample_id),
            cache=False,
        )


def test_the_cache_is_reused_checked_and_rebuilt(tmp_path):
    dm, model = datamodule(), ConvEmbedder()
    q = dm.query_table.sample_id
    first = train_head(model, dm.gallery_dataloader(), query_ids=q, cache=tmp_path)
    path = first.record["path"]
    assert path and not first.record["cached"] and sidecar_path(path).is_file()
    model.calls = 0
    again = train_head(model, dm.gallery_dataloader(), query_ids=q, cache=tmp_path)
    assert again.record["cached"] and model.calls == 0  # no gallery pass
    assert torch.equal(again.head.weight, first.head.weight)
    # a cached head whose training images are queries now is refused too
    with pytest.raises(QueryLeakError, match="cached head was trained on"):
        train_head(
            model,
            dm.gallery_dataloader(),
            query_ids=[int(dm.gallery_table().sample_id[0])],
            cache=tmp_path,
        )
    # another recipe, another file; other weights, another file
    other = train_head(model, dm.gallery_dataloader(), query_ids=q, cache=tmp_path, l2=0.1)
    assert other.record["path"] != path and not other.record["cached"]
    moved = train_head(ConvEmbedder(seed=1), dm.gallery_dataloader(), query_ids=q, cache=tmp_path)
    assert moved.record["path"] != path
    # a damaged file: recomputed with a warning, same head
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.warns(UserWarning, match="recomputing the classification head"):
        fixed = train_head(model, dm.gallery_dataloader(), query_ids=q, cache=tmp_path)
    assert not fixed.record["cached"]
    assert torch.equal(fixed.head.weight, first.head.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_head(model, dm.gallery_dataloader(), query_ids=q, cache=tmp_path).record[
            "cached"
        ]


def test_caching_without_a_manifest_hash_is_refused(tmp_path):
    dm, model = datamodule(), ConvEmbedder()
    loader = dm.gallery_dataloader()
    loader.dataset.manifest_hash = ""
    with pytest.raises(ValueError, match="manifest hash"):
        train_head(model, loader, query_ids=[], cache=tmp_path)


# ---------------------------------------------------------------------------- accuracy


def brute_force_accuracy(model, dm, class_ids):
    ds = dm.query_dataset()
    counts: dict[int, list[int]] = {}
    with torch.no_grad():
        for k in range(len(ds)):
            it = ds[k]
            c = counts.setdefault(it.resolution, [0, 0])
            if it.identity not in class_ids.tolist():
                continue
            pred = int(class_ids[model(it.image[None]).argmax(1)][0])
            c[0] += pred == it.identity
            c[1] += 1
    return {r: tuple(v) for r, v in counts.items()}


def test_head_accuracy_counts_correct_queries_per_resolution_like_brute_force():
    dm = datamodule(resolutions=(8, 16, 0))
    model = ConvEmbedder()
    head = train_head(
        model, dm.gallery_dataloader(), query_ids=dm.query_table.sample_id, cache=False
    )
    acc = head_accuracy(head, dm.test_dataloader())
    assert acc == brute_force_accuracy(head, dm, head.class_ids)
    assert sorted(acc) == [0, 8, 16]
    # a classifier without class_ids (the gallery's) works given them
    gallery = compute_templates(model, dm.gallery_dataloader(), num_classes=dm.num_classes)
    gc = GalleryClassifier(model, gallery.features)
    assert head_accuracy(gc, dm.test_dataloader(), class_ids=gallery.ids) == (
        brute_force_accuracy(gc, dm, gallery.ids)
    )
    with pytest.raises(ValueError, match="class_ids"):
        head_accuracy(gc, dm.test_dataloader())


def test_queries_without_a_class_are_left_out_of_n():
    dm = datamodule(resolutions=(0,))
    model = ConvEmbedder()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 2, 3, 4])  # identity 5 has no class
    head = HeadClassifier(model, torch.randn(5, 8, generator=g), torch.zeros(5), ids)
    acc = head_accuracy(head, dm.test_dataloader())
    n_with_class = int(np.isin(dm.query_table.identity, ids.numpy()).sum())
    assert acc[0][1] == n_with_class < len(dm.query_table)
    assert acc == brute_force_accuracy(head, dm, ids)
    pred = head_predictions(head, dm.test_dataloader())
    assert torch.isin(pred["predicted"], ids).all()


# ---------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        dm = datamodule()
        # each rank's backbone differs: only rank 0's may shape the head every rank attacks
        model = ConvEmbedder(seed=rank)
        head = train_head(
            model, dm.gallery_dataloader(), query_ids=dm.query_table.sample_id, cache=False
        )
        torch.save(
            {"weight": head.head.weight, "bias": head.head.bias, "calls": model.calls},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_under_ddp_rank_zero_trains_and_every_rank_gets_its_head(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["calls"] > 0 and r1["calls"] == 0
    assert torch.equal(r0["weight"], r1["weight"]) and torch.equal(r0["bias"], r1["bias"])
    dm = datamodule()
    alone = train_head(
        ConvEmbedder(seed=0),
        dm.gallery_dataloader(),
        query_ids=dm.query_table.sample_id,
        cache=False,
    )
    assert torch.equal(alone.head.weight, r0["weight"])
