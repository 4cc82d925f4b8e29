"""Cross-resolution training (``crossres fit``) on a tiny seeded model and synthetic faces:
the loss goes down, the teacher is untouched, resolutions follow 2**int(3 + 5u), the tensor
degradation matches the PIL pipeline, checkpoints load through the model registry into the
test pipeline, the validation hit rate equals a brute-force one, and two gloo processes agree."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import yaml
from PIL import Image
from scipy import stats

from crossres.cli import main as crossres_main
from crossres.datamodules.cr_data import CrossResolutionDataModule, FaceAugmentation, augment_faces
from crossres.datamodules.resolution import ResolutionTransform, degrade
from crossres.datamodules.synthetic import SyntheticFacesDataModule, synthetic_face
from crossres.lightning_modules.cr_export import StudentExport, save_state_dict
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE
from crossres.lightning_modules.cr_resolution import (
    degrade_batch,
    input_resolution,
    sample_training_resolution,
)
from crossres.lightning_modules.cr_training import CrossResolutionDistillation
from crossres.lightning_modules.frozen_target import FrozenTarget, TargetSpec
from crossres.models.base import PretrainedConfig
from crossres.models.registry import build_model
from crossres.models.weights import read_tensors

ROOT = Path(__file__).resolve().parents[1]
N_IDS = 8
TINY = {"num_classes": N_IDS, "seed": 1}


def make_source(**kw) -> SyntheticFacesDataModule:
    args = dict(n_identities=N_IDS, n_images=4, resolutions=[8, 16, 0], batch_size=8, image_size=32)
    args.update(kw)
    return SyntheticFacesDataModule(input_size=32, **args)


def make_module(**kw) -> CrossResolutionDistillation:
    args = dict(options={**TINY, "input_size": 32}, lr=0.2)
    args.update(kw)
    return CrossResolutionDistillation("tiny_facenet", **args)


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    args.update(kw)
    return pl.Trainer(**args)


# ----------------------------------------------------------------------------- resolutions


def test_resolution_sampler_follows_two_to_the_int_of_3_plus_5u():
    draws = [sample_training_resolution(7, 0, k) for k in range(4000)]
    counts = Counter(draws)
    assert set(counts) == {8, 16, 32, 64, 128}
    # analytic: P(int(3 + 5u) = e) = P(u in [(e-3)/5, (e-2)/5)) = 1/5 for e = 3..7
    observed = [counts[2**e] for e in range(3, 8)]
    assert stats.chisquare(observed, [len(draws) / 5] * 5).pvalue > 1e-3
    # keyed, not stateful: the same key gives the same draw in any order or process
    assert [sample_training_resolution(7, 0, k) for k in (5, 3, 5)] == [
        draws[5],
        draws[3],
        draws[5],
    ]
    assert draws != [sample_training_resolution(8, 0, k) for k in range(4000)]
    other = Counter(sample_training_resolution(0, k, exponents=(1, 3)) for k in range(2000))
    assert set(other) == {2, 4} and abs(other[2] / 2000 - 0.5) < 0.05
    with pytest.raises(ValueError, match="exponents"):
        sample_training_resolution(0, 1, exponents=(5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        sample_training_resolution(-1, 0)


def test_log_uniform_sampler_follows_its_cdf_and_covers_every_size():
    lo, hi, n = 3, 7, 6000
    draws = [
        sample_training_resolution(4, 0, k, exponents=(lo, hi), sampling="log_uniform")
        for k in range(n)
    ]
    assert min(draws) >= 2**lo and max(draws) < 2**hi
    # analytic: r = int(2**(lo + (hi - lo) u)) < m  <=>  u < (log2(m) - lo) / (hi - lo), m int
    edges = [8, 12, 16, 20, 24, 32, 48, 64, 96, 128]
    expected = np.diff([(np.log2(m) - lo) / (hi - lo) for m in edges]) * n
    observed = np.histogram(draws, bins=edges)[0]
    assert observed.sum() == n
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert {16, 24, 64} <= set(draws)  # the benchmark's low resolutions are trained on
    assert draws[:50] == [
        sample_training_resolution(4, 0, k, exponents=(lo, hi), sampling="log_uniform")
        for k in range(50)
    ]
    with pytest.raises(ValueError, match="sampling"):
        sample_training_resolution(0, 1, sampling="uniform")
    lm = make_module(seed=3, exponents=(3, 7), resolution_sampling="log_uniform")
    assert [lm.training_resolution(b, epoch=1) for b in range(20)] == [
        sample_training_resolution(3, 1, b, exponents=(3, 7), sampling="log_uniform")
        for b in range(20)
    ]


def test_holdout_is_kept_out_of_training_and_seeded():
    src = make_source(n_images=6)
    src.setup("fit")
    gallery = src.gallery_table().sample_id.tolist()
    dm = CrossResolutionDataModule(src, holdout=5, seed=2)
    train = [int(b.sample_id[i]) for b in dm.train_dataloader() for i in range(len(b))]
    held = [int(b.sample_id[i]) for b in dm.holdout_dataloader() for i in range(len(b))]
    assert len(held) == 5 and len(set(train)) == len(train) == len(gallery) - 5
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(gallery)
    again = CrossResolutionDataModule(src, holdout=5, seed=2).holdout_rows()
    assert (
        again
        == dm.holdout_rows()
        != CrossResolutionDataModule(src, holdout=5, seed=3).holdout_rows()
    )
    assert CrossResolutionDataModule(src, holdout=0).training_rows() == list(range(len(gallery)))
    with pytest.raises(ValueError, match="holdout"):
        CrossResolutionDataModule(src, holdout=-1)
    with pytest.raises(ValueError, match="nothing to train"):
        CrossResolutionDataModule(src, holdout=len(gallery)).training_rows()


def test_module_draws_one_resolution_per_batch_keyed_by_epoch_and_batch():
    lm = make_module(seed=3)
    got = [lm.training_resolution(b, epoch=e) for e in range(3) for b in range(50)]
    assert got == [sample_training_resolution(3, e, b) for e in range(3) for b in range(50)]


@pytest.mark.parametrize("size", [(32, 32), (48, 32), (32, 40)])
def test_degrade_batch_matches_the_pil_pipeline_on_an_image_at_input_size(size):
    img = synthetic_face(0, 3, 1, size=32).resize(size, Image.BILINEAR)
    x = TF.to_tensor(img)[None]
    for r in (4, 8, 16):
        ours = degrade_batch(x, r)[0]
        pil = TF.to_tensor(degrade(img, r))
        diff = (ours - pil).abs()
        # PIL rounds the small image to 8 bits; otherwise the same triangle filter
        assert diff.mean() < 1 / 255 and diff.max() < 3 / 255, (r, diff.mean(), diff.max())
        assert (x[0] - pil).abs().mean() > 4 * diff.mean()  # the degradation itself is larger
    assert torch.equal(degrade_batch(x, min(size)), x)  # r >= shortest side: unchanged
    assert torch.equal(degrade_batch(x, 1000), x)


def test_source_resolution_is_scaled_to_the_centre_crop():
    cfg = PretrainedConfig(input_size=(3, 224, 224), resize_shortest=256)
    assert [input_resolution(r, cfg) for r in (8, 16, 128)] == [7, 14, 112]
    assert input_resolution(16, cfg, reference="input") == 16
    assert (
        input_resolution(16, PretrainedConfig(input_size=(3, 150, 150), resize_shortest=None)) == 16
    )
    # against the benchmark's PIL pipeline (degrade the original, then resize and crop)
    small = PretrainedConfig(input_size=(3, 56, 56), resize_shortest=64)
    img = synthetic_face(0, 2, 0, size=96)
    full = ResolutionTransform(None, input_size=56, resize_shortest=64)(img)[None]
    for r in (16, 32):
        pil = ResolutionTransform(r, input_size=56, resize_shortest=64)(img)
        scaled = (degrade_batch(full, input_resolution(r, small))[0] - pil).abs().mean()
        unscaled = (degrade_batch(full, r)[0] - pil).abs().mean()
        assert scaled < unscaled < (full[0] - pil).abs().mean()


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_range_identity_and_flip():
    x = torch.rand(5, 3, 16, 12)
    g = torch.Generator().manual_seed(0)
    y = augment_faces(x, FaceAugmentation(), generator=g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    again = augment_faces(x, FaceAugmentation(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    none = FaceAugmentation(flip=0, crop_scale=1, brightness=0, contrast=0, saturation=0)
    torch.testing.assert_close(augment_faces(x, none, generator=g), x, rtol=0, atol=1e-6)
    flip = FaceAugmentation(flip=1, crop_scale=1, brightness=0, contrast=0, saturation=0)
    torch.testing.assert_close(augment_faces(x, flip, generator=g), x.flip(-1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="crop_scale"):
        FaceAugmentation(crop_scale=0)


# ----------------------------------------------------------------------------- training


def dataset_loss(lm: CrossResolutionDistillation, dm: SyntheticFacesDataModule) -> float:
    """Mean loss over the training images at 8, 16 and 32 px, student in eval mode."""
    lm.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in dm.train_dataloader():
            for r in (8, 16, 32):
                total += float(lm.distillation_loss(b.images, b.identity, r)["loss"]) * len(b)
                n += len(b)
    return total / n


def test_a_few_steps_lower_the_loss_and_leave_the_teacher_bit_identical(tmp_path):
    lm = make_module()
    fresh = build_model("tiny_facenet", **TINY, input_size=32)
    src = make_source()
    src.setup("fit")
    before = dataset_loss(lm, src)
    trainer(tmp_path, limit_val_batches=0).fit(lm, datamodule=CrossResolutionDataModule(src))
    after = dataset_loss(lm, src)
    assert after < 0.8 * before, (before, after)
    assert lm.global_step == 2 * 4  # 16 gallery images / batch 8, 4 epochs
    assert len({r for _, _, r in lm.sampled}) > 1
    for name, t in fresh.state_dict().items():
        assert torch.equal(lm.teacher.state_dict()[name], t), name  # teacher untouched, bit for bit
    assert not any(p.requires_grad for p in lm.teacher.parameters()) and not lm.teacher.training
    moved = [
        n for n, t in fresh.state_dict().items() if not torch.equal(lm.student.state_dict()[n], t)
    ]
    assert moved  # the student did learn


def test_label_free_variant_freezes_the_classifier_and_needs_no_labels(tmp_path):
    lm = make_module(label_free=True)
    assert not lm.student.fc.weight.requires_grad and lm.student.body[0].weight.requires_grad
    fc_before = lm.student.fc.weight.clone()
    x = torch.rand(4, 3, 32, 32)
    terms = lm.distillation_loss(x, None, 8)
    assert set(terms) == {"loss", "mse"}
    reference = F.mse_loss(lm.student.features(degrade_batch(x, 8)), lm.teacher.features(x))
    torch.testing.assert_close(terms["loss"], reference)
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(
        lm, datamodule=CrossResolutionDataModule(make_source())
    )
    assert torch.equal(lm.student.fc.weight, fc_before)  # weight decay did not touch it
    # an embedder without classifier is label-free by default, and refuses cross-entropy
    assert make_module(options={"input_size": 32}).label_free
    with pytest.raises(ValueError, match="label_free"):
        make_module(options={"input_size": 32}, label_free=False)


# ----------------------------------------------------------------------------- the command line

FIT_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {"monitor": "val/hit_rate_r8", "mode": "max", "save_last": True},
            },
            {"class_path": "crossres.lightning_modules.cr_training.StudentExport"},
        ],
    },
    "model": {
        "class_path": "crossres.lightning_modules.cr_training.CrossResolutionDistillation",
        "init_args": {"model": "tiny_facenet", "options": {**TINY, "input_size": 32}, "lr": 0.2},
    },
    "data": {
        "class_path": "crossres.datamodules.cr_data.CrossResolutionDataModule",
        "init_args": {
            "source": {
                "class_path": "crossres.datamodules.synthetic.SyntheticFacesDataModule",
                "init_args": {
                    "n_identities": N_IDS,
                    "n_images": 4,
                    "image_size": 32,
                    "resolutions": [8, 16, 0],
                    "batch_size": 8,
                },
            },
            "augmentation": {"flip": 0.5, "crop_scale": 0.9},
        },
    },
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``crossres fit`` through the CLI: run directory, checkpoints and exported student."""
    run = tmp_path_factory.mktemp("cr_fit")
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump(FIT_CONFIG))
    seen = {}
    original = StudentExport.on_train_end

    def spying(self, trainer, pl_module):  # keeps what the CLI built, at the end of fit
        seen["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        seen["module"] = pl_module
        seen["datamodule"] = trainer.datamodule
        original(self, trainer, pl_module)

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(StudentExport, "on_train_end", spying)
        args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run)]
        assert crossres_main(args) == 0
    return run, seen


def test_cli_fit_links_the_input_size_and_exports_the_student(fitted):
    run, seen = fitted
    dm = seen["datamodule"]
    assert dm.source.input_size == (32, 32) and dm.source.resize_shortest is None
    assert (run / "student.pt").is_file() and (run / "student.pt.sha256").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert {"val/hit_rate_r8", "val/hit_rate_r16", "val/hit_rate_r0"} <= set(seen["metrics"])


def test_checkpoint_round_trip_into_the_test_pipeline(fitted):
    run, seen = fitted
    lm: CrossResolutionDistillation = seen["module"]
    ckpt = run / "checkpoints" / "last.ckpt"
    fmt, tensors = read_tensors(ckpt)
    assert fmt.endswith("lightning-checkpoint")
    assert tensors and all(k.startswith("student.") for k in tensors)  # no teacher copy
    x = torch.rand(6, 3, 32, 32)
    lm.student.eval()
    with torch.no_grad():
        expected = lm.student.features(x)
        for path in (ckpt, run / "student.pt"):
            m = build_model("tiny_facenet", weights=str(path), **TINY, input_size=32).eval()
            torch.testing.assert_close(m.features(x), expected, rtol=0, atol=0)
        # crossres test: FrozenTarget builds its targets through the registry, unchanged
        target = FrozenTarget(
            [
                TargetSpec(
                    name="tiny_facenet",
                    label="CR",
                    weights=str(ckpt),
                    options={**TINY, "input_size": 32},
                )
            ]
        )
        torch.testing.assert_close(target.models["CR"].features(x), expected, rtol=0, atol=0)
    # Lightning's own resume/load restores the teacher from the model, not the file
    again = CrossResolutionDistillation.load_from_checkpoint(ckpt)
    for k, v in lm.teacher.state_dict().items():
        assert torch.equal(again.teacher.state_dict()[k], v)


def test_exported_state_dict_bytes_depend_on_the_tensors_only(tmp_path):
    model = build_model("tiny_facenet", **TINY)
    a = save_state_dict(model, tmp_path / "a.pt")
    b = save_state_dict(model, tmp_path / "sub" / "b.pt")
    assert a == b and (tmp_path / "a.pt.sha256").read_text().startswith(a)
    with torch.no_grad():
        model.fc.bias[0] += 1e-6
    assert save_state_dict(model, tmp_path / "c.pt") != a


def test_validation_hit_rate_equals_brute_force(fitted):
    run, seen = fitted
    lm: CrossResolutionDistillation = seen["module"]
    src = seen["datamodule"].source
    model = lm.student.eval()
    with torch.no_grad():
        g = next(
            iter(
                torch.utils.data.DataLoader(
                    src.gallery_dataset(),
                    batch_size=10**4,
                    collate_fn=src.gallery_dataset().collate,
                )
            )
        )
        gf = model.features(g.images).double()
        ids = sorted(set(g.identity.tolist()))
        templates = torch.stack([gf[g.identity == i].mean(0) for i in ids])
        q = next(
            iter(
                torch.utils.data.DataLoader(
                    src.query_dataset(), batch_size=10**4, collate_fn=src.query_dataset().collate
                )
            )
        )
        sims = (
            F.normalize(model.features(q.images).double(), dim=1) @ F.normalize(templates, dim=1).T
        )
    for r in (8, 16, 0):
        rows = (q.resolution == r).nonzero().flatten()
        hits = 0
        for i in rows.tolist():
            mate = ids.index(int(q.identity[i]))
            others = torch.cat([sims[i, :mate], sims[i, mate + 1 :]])
            hits += int(bool((others < sims[i, mate]).all()))  # rank 1: no non-mate scores >= mate
        assert seen["metrics"][f"val/hit_rate_r{r}"] == pytest.approx(hits / len(rows), abs=1e-6)


def test_committed_configs_parse_and_the_dlib_recipe_matches():
    recipe = yaml.safe_load((ROOT / "configs" / "cr_dlib.yaml").read_text())
    assert recipe == CR_DLIB_RECIPE
    for name in ("cr_dlib.yaml", "paper/cr_training.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            crossres_main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
        assert exit_info.value.code == 0, name
    paper = yaml.safe_load((ROOT / "configs" / "paper" / "cr_training.yaml").read_text())
    init = paper["model"]["init_args"]
    assert (init["lr"], init["momentum"], init["weight_decay"], init["feature_weight"]) == (
        0.001,
        0.9,
        0.0005,
        0.1,
    )
    assert paper["trainer"]["accumulate_grad_batches"] == 8
    assert paper["data"]["init_args"]["source"]["init_args"]["batch_size"] == 32


# ----------------------------------------------------------------------------- DDP

WORLD = 2


def ddp_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        os.environ.update(
            LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0"
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29547")
        pl.seed_everything(0, verbose=False)
        lm = make_module(seed=5)
        export = StudentExport(str(Path(out) / "student.pt"))
        t = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp",
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            callbacks=[export],
        )
        dm = CrossResolutionDataModule(make_source(batch_size=4), augmentation=FaceAugmentation())
        t.fit(lm, datamodule=dm)
        digest = [float(p.double().sum()) for p in lm.student.state_dict().values()]
        result = {
            "sampled": lm.sampled,
            "hit": {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("val/")},
            "weights": digest,
        }
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fit_with_two_gloo_processes(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # 16 gallery images, 2 shards of 8, batches of 4: 2 batches per epoch on each rank
    assert parts[0]["sampled"] == parts[1]["sampled"]
    assert parts[0]["sampled"] == [
        [e, b, sample_training_resolution(5, e, b)] for e in range(2) for b in range(2)
    ]
    assert parts[0]["weights"] == parts[1]["weights"]  # gradients were averaged
    assert parts[0]["hit"] == parts[1]["hit"] and set(parts[0]["hit"]) == {
        "val/hit_rate_r8",
        "val/hit_rate_r16",
        "val/hit_rate_r0",
    }
    # the hit rate gathered from the two shards equals one process scoring every query
    lm = make_module()
    lm.student = build_model(
        "tiny_facenet", weights=str(tmp_path / "student.pt"), **TINY, input_size=32
    )
    single = trainer(tmp_path / "single")
    single.validate(lm, datamodule=CrossResolutionDataModule(make_source()), verbose=False)
    for k, v in parts[0]["hit"].items():
        assert float(single.callback_metrics[k]) == pytest.approx(v, abs=1e-9), k
