"""Under DDP (two gloo processes) every query is evaluated exactly once and the gallery
templates equal the single-process ones; Lightning's own test loop keeps the exact sharding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from crossres.datamodules.base import ShardSampler
from crossres.datamodules.synthetic import SyntheticFacesDataModule
from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.templates import compute_templates

WORLD = 2


def make_dm(**kw) -> SyntheticFacesDataModule:
    # 7 query identities x 1 query image x 3 resolutions = 21 items: odd, so shards differ
    args = dict(
        n_identities=7,
        n_images=4,
        query_fraction=0.25,
        image_size=16,
        input_size=16,
        resolutions=[4, 8, 0],
        batch_size=4,
    )
    args.update(kw)
    return SyntheticFacesDataModule(**args)


class Embedder(FaceModel):
    def __init__(self) -> None:
        super().__init__(
            PretrainedConfig(input_size=(3, 16, 16), resize_shortest=None, feature_dim=5)
        )
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def test_step(self, batch, batch_idx):
        self.seen += [
            [s, r] for s, r in zip(batch.sample_id.tolist(), batch.resolution.tolist(), strict=True)
        ]


def keys(dm: SyntheticFacesDataModule) -> list[list[int]]:
    return [
        [s, r]
        for b in dm.test_dataloader()
        for s, r in zip(b.sample_id.tolist(), b.resolution.tolist(), strict=True)
    ]


def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dm = make_dm()
        dm.setup("test")
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, ShardSampler)
        result = {"plain": keys(dm), "padded": keys(make_dm(pad_shards=True))}
        model = Embedder()
        g = compute_templates(
            model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=Path(out) / "t"
        )
        torch.save({"features": g.features, "ids": g.ids}, Path(out) / f"templates{rank}.pt")
        model.features = None  # the second call must come from the cache on every rank
        g2 = compute_templates(
            model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=Path(out) / "t"
        )
        result["cache_equal"] = bool(torch.equal(g.features, g2.features))

        # Lightning's test loop in the same two processes (launched externally, as torchrun does)
        os.environ.update(
            LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0"
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        rec = Recorder()
        trainer.test(rec, datamodule=make_dm(), verbose=False)
        result["lightning"] = rec.seen
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_query_once_and_exact_templates_across_two_processes(tmp_path):
    dm = make_dm()
    dm.setup("test")
    expected = sorted(keys(dm))
    assert len(expected) == 21
    ref = compute_templates(
        Embedder(), dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False
    )

    mp.spawn(worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD, join=True)

    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for mode in ("plain", "lightning"):
        got = [k for p in parts for k in p[mode]]
        assert sorted(got) == expected, mode  # each (sample, resolution) exactly once
        assert {len(p[mode]) for p in parts} == {10, 11}
    padded = [k for p in parts for k in p["padded"]]
    assert len(padded) == 22 and sorted({tuple(k) for k in padded}) == [tuple(k) for k in expected]
    for r in range(WORLD):
        t = torch.load(tmp_path / f"templates{r}.pt", weights_only=True)
        assert torch.equal(t["ids"], ref.ids)
        torch.testing.assert_close(t["features"], ref.features, rtol=1e-6, atol=1e-7)
        assert parts[r]["cache_equal"]
    assert len(list((tmp_path / "t").glob("templates-*.pt"))) == 1
