"""AttackCallback's threat models and kept adversarials: the datamodule hands out the captures
with the same sample ids, the low-resolution attack keeps its budget on the capture's pixels
and records its space, it is the model-input attack where nothing is degraded, and every
attacked row has its adversarial image, which reproduces the row when scored again."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from crossres.adversarial_store import AdversarialImageStore
from crossres.attacks import CarliniWagnerL2, DeepRepresentation
from crossres.callbacks import AttackCallback, ResultStoreCallback
from crossres.datamodules import SyntheticFacesDataModule
from crossres.datamodules.resolution import ResolutionTransform
from crossres.datamodules.synthetic import synthetic_face
from crossres.lightning_modules import FrozenTarget
from crossres.lightning_modules.frozen_target import TargetSpec
from crossres.models.low_resolution import LowResolutionInput
from crossres.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255
RES = [8, 0]  # 8: a 8x8 capture of the 64 px face; 0: the face itself, which is the model input


def datamodule(**kw) -> SyntheticFacesDataModule:
    args = dict(n_identities=6, n_images=4, resolutions=RES, batch_size=4, input_size=64)
    return SyntheticFacesDataModule(**{**args, **kw})


def callbacks(run_dir, *, keep: bool = True) -> list[pl.Callback]:
    out: list[pl.Callback] = [ResultStoreCallback(str(run_dir))]
    for space in ("model_input", "low_resolution"):
        out.append(
            AttackCallback(
                CarliniWagnerL2(binary_search_steps=2, steps=8, initial_const=1.0),
                name=f"CW {space}",
                space=space,
                keep_adversarials=keep,
            )
        )
        out.append(
            AttackCallback(
                DeepRepresentation(epsilon=EPS, steps=6),
                name=f"DR {space}",
                objective="impersonation",
                space=space,
                keep_adversarials=keep,
            )
        )
    return out


def run(run_dir, *, keep: bool = True) -> FrozenTarget:
    model = FrozenTarget([TargetSpec(name="tiny_facenet", label="tiny")])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        callbacks=callbacks(run_dir, keep=keep),
        default_root_dir=str(run_dir),
    )
    trainer.test(model, datamodule=datamodule())
    return model


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("space") / "run"
    model = run(run_dir)
    return run_dir, model, {r.key: r for r in ResultStore(run_dir).rows()}


def capture(sample_id: int, r: int) -> torch.Tensor:
    """The capture by the PIL pipeline itself, independent of the datamodule."""
    identity, index = divmod(sample_id, 4)
    return ResolutionTransform(r, input_size=64, resize_shortest=None).low_resolution(
        synthetic_face(0, identity, index, size=64)
    )


def test_the_datamodule_hands_out_the_captures_with_the_same_ids():
    plain, low = datamodule(), datamodule()
    plain.setup("test")
    low.setup("test")
    low.hand_out_low_resolution()
    n = 0
    for a, b in zip(plain.test_dataloader(), low.test_dataloader(), strict=True):
        assert a.low_resolution is None and a.original_size is None
        assert torch.equal(a.images, b.images) and torch.equal(a.sample_id, b.sample_id)
        assert b.original_size.tolist() == [[64, 64]] * len(b)
        for s, r, t in zip(
            b.sample_id.tolist(), b.resolution.tolist(), b.low_resolution, strict=True
        ):
            assert torch.equal(t, capture(s, r))
            n += 1
        sub = b.select(torch.tensor([len(b) - 1, 0]))
        assert sub.sample_id.tolist() == [b.sample_id[-1].item(), b.sample_id[0].item()]
        assert sub.low_resolution[0] is b.low_resolution[-1]
    assert n == 12 * len(RES)


def test_rows_record_the_space_and_the_low_resolution_budget_holds_on_the_capture(done):
    run_dir, _, rows = done
    store = AdversarialImageStore(run_dir)
    seen = 0
    for keys, images, meta in store.iter_batches(attack="DR low_resolution"):
        assert meta["space"] == "low_resolution"
        for key, adv in zip(keys, images, strict=True):
            _, _, sid, r = key
            clean = capture(sid, r)
            assert adv.shape == clean.shape == ((3, 8, 8) if r == 8 else (3, 64, 64))
            err = meta["max_abs_error"] + 1e-6
            linf = float((adv - clean).abs().max())
            assert linf <= EPS + err
            row = rows[key]
            assert row.space == "low_resolution"
            assert row.linf == pytest.approx(linf, abs=err)
            assert row.l2 == pytest.approx(float((adv - clean).norm()), abs=err * 64 * 14)
            seen += 1
    assert seen == 24
    spaces = {(r.attack, r.space) for r in rows.values()}
    assert ("CW model_input", "model_input") in spaces and ("clean", "model_input") in spaces


def test_without_degradation_the_spaces_coincide(done):
    _, _, rows = done
    for kind in ("CW", "DR"):
        for key, a in rows.items():
            if key[1] != f"{kind} model_input" or key[3] != 0:
                continue
            b = rows[(key[0], f"{kind} low_resolution", key[2], key[3])]
            for f in ("success", "adv_top1", "mate_rank", "l2", "linf", "iterations", "target"):
                assert getattr(a, f) == getattr(b, f), (key, f)
            assert a.mate_score == b.mate_score


def test_kept_adversarials_reproduce_their_rows(done):
    run_dir, model, rows = done
    target = model.targets["tiny"]
    store = AdversarialImageStore(run_dir)
    attacked = {k for k in rows if k[1] != "clean"}
    assert store.done_keys() == attacked
    for keys, images, meta in store.iter_batches():
        r = keys[0][3]
        net = target.model
        if meta["space"] == "low_resolution" and r == 8:
            net = LowResolutionInput(target.model, (64, 64), resolution=8)
        with torch.no_grad():
            features, logits = net.features_and_logits(images)
        ids = torch.tensor([rows[k].identity for k in keys])
        search = target.search(features, ids)
        for i, k in enumerate(keys):
            assert int(target.predict(logits)[i]) == rows[k].adv_top1
            assert float(search["mate_score"][i]) == pytest.approx(rows[k].mate_score, abs=1e-3)


def test_keep_adversarials_off_writes_no_images(tmp_path):
    run(tmp_path / "off", keep=False)
    assert AdversarialImageStore(tmp_path / "off").files() == []
    assert len(ResultStore(tmp_path / "off").rows()) == 24 * 5


def test_bad_space_is_refused():
    with pytest.raises(ValueError, match="space"):
        AttackCallback(CarliniWagnerL2(), space="pixels")
