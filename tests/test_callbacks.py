"""The contract between the frozen target and its callbacks, with a bare ``pl.Trainer``: the
test step's typed output, and the clear errors of a callback set-up that would lose rows."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from crossres.attacks import CarliniWagnerL2
from crossres.callbacks import AttackCallback, MetricCallback, ResultStoreCallback
from crossres.callbacks.attack import check_unique_names
from crossres.datamodules import SyntheticFacesDataModule
from crossres.errors import CrossresError
from crossres.lightning_modules import FrozenTarget, TargetSpec
from crossres.lightning_modules.frozen_target import TargetOutput
from crossres.store import ResultStore


def trainer(tmp_path, callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


def parts():
    module = FrozenTarget([TargetSpec("tiny_facenet", "tiny")])
    dm = SyntheticFacesDataModule(
        n_identities=4, n_images=3, resolutions=[0], batch_size=4, input_size=64
    )
    return module, dm


def cw(name: str = "CW") -> AttackCallback:
    return AttackCallback(CarliniWagnerL2(binary_search_steps=1, steps=2), name=name)


def test_an_attack_callback_without_a_result_store_is_an_error_at_set_up(tmp_path, one_thread):
    module, dm = parts()
    with pytest.raises(CrossresError, match="needs a ResultStoreCallback"):
        trainer(tmp_path, [cw()]).test(module, datamodule=dm)
    assert not module.targets  # stopped before the galleries were built


@pytest.mark.parametrize("names", [["CW", "CW"], ["CW", "clean"]])
def test_attack_names_must_be_unique_and_not_clean(names):
    with pytest.raises(CrossresError, match="same name|'clean'"):
        check_unique_names([cw(n) for n in names])
    check_unique_names([cw("a"), cw("b"), ResultStoreCallback()])


class Spy(pl.Callback):
    def __init__(self) -> None:
        self.outputs = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append((outputs, batch))


def test_the_test_step_returns_a_typed_output_per_target(tmp_path, one_thread):
    module, dm = parts()
    spy = Spy()
    store = ResultStoreCallback()
    trainer(tmp_path, [store, cw(), MetricCallback(), spy]).test(module, datamodule=dm)
    rows = {r.key: r for r in ResultStore(tmp_path).rows()}
    for outputs, batch in spy.outputs:
        (out,) = outputs.values()
        assert isinstance(out, TargetOutput) and out.target is module.targets["tiny"]
        logits = out.target.model(batch.images)
        assert torch.equal(out.top1, out.target.class_ids[logits.argmax(1)])
        # a query enrolled in the gallery moves away from its own class
        assert torch.equal(out.target.class_ids[out.attack_labels], batch.identity)
        for i, sid in enumerate(batch.sample_id.tolist()):
            row = rows[("tiny", "clean", sid, 0)]
            assert row.clean_top1 == int(out.top1[i])
            assert rows[("tiny", "CW", sid, 0)].clean_top1 == row.clean_top1
    assert len(rows) == 2 * len(dm.test_dataloader().dataset)
