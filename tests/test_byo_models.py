"""The bring-your-own models work where any registry model works: their example configs
(configs/examples/) hand the model's input size to the datamodule, the attacks run on them, and
a whole ``crossres test`` run on the embedded faces completes.

Weight files here are random (the released ones are not redistributable), written with the
bare names the released files use; the 18-layer IResNet stands in for the 50-layer one to keep
the runs short (same code, fewer blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from crossres.attacks import CarliniWagnerL2, DeepRepresentation
from crossres.cli import CrossresCLI, main
from crossres.io import sha256_file
from crossres.lightning_modules.cr_export import StudentExport
from crossres.models import GalleryClassifier, build_model, list_models
from crossres.models.arcface import ArcFaceIResNet
from crossres.models.facenet import FaceNetInceptionResnetV1
from crossres.store import CLEAN, ResultStore
from crossres.types import Gallery
from random_weights import randomise

ROOT = Path(__file__).parents[1]
EXAMPLES = {
    # config: (registered name in it, name used here, input side)
    "arcface_iresnet50.yaml": ("arcface_iresnet50", "arcface_iresnet18", 112),
    "facenet_vggface2.yaml": ("facenet_vggface2", "facenet_vggface2", 160),
}


def weight_file(name: str, path: Path) -> Path:
    """Random weights for ``name`` saved as its release saves them (bare names)."""
    net = (
        ArcFaceIResNet(18).net if name.startswith("arcface") else FaceNetInceptionResnetV1(8631).net
    )
    randomise(net, seed=7)
    torch.save(net.state_dict(), path)
    return path


def example(config: str, tmp_path: Path, *, quick: bool) -> tuple[Path, Path]:
    """The example config with its model swapped to the stand-in and a random weight file;
    ``quick``: one resolution, one query per identity, no singles or distractors, attacks of
    2 steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "examples" / config).read_text())
    registered, name, _ = EXAMPLES[config]
    (target,) = cfg["model"]["init_args"]["targets"]
    assert target["name"] == registered and registered in list_models()
    assert target["weights"].startswith("weights/")
    weights = weight_file(name, tmp_path / Path(target["weights"]).name)
    target.update(name=name, weights=str(weights))
    cfg["trainer"]["logger"] = False
    if quick:
        cfg["data"]["init_args"].update(
            resolutions=[24], max_queries_per_identity=1, n_single_queries=0, max_distractors=0
        )
        for cb in cfg["trainer"]["callbacks"]:
            args = cb["init_args"]["attack"]["init_args"]
            args.update(
                steps=2, **({"binary_search_steps": 1} if "binary_search_steps" in args else {})
            )
    path = tmp_path / config
    path.write_text(yaml.safe_dump(cfg))
    return path, weights


@pytest.mark.parametrize("config", sorted(EXAMPLES))
def test_example_config_gives_the_datamodule_the_models_input(config, tmp_path, one_thread):
    path, weights = example(config, tmp_path, quick=False)
    cli = CrossresCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        run=False,
        args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")],
    )
    side = EXAMPLES[config][2]
    assert cli.datamodule.input_size in (side, (side, side))
    assert cli.datamodule.resize_shortest is None
    (model,) = cli.model.models.values()
    assert model.pretrained_cfg.weights_hash == sha256_file(weights)
    assert model.pretrained_cfg.input_size == (3, side, side)


@pytest.mark.slow
def test_example_config_runs_crossres_test(tmp_path, one_thread):
    # one of the two (a run takes 15-30 s on one shared core); the other's model is attacked
    # below and its config instantiated above
    path, _ = example("arcface_iresnet50.yaml", tmp_path, quick=True)
    run = tmp_path / "run"
    main(["test", "--config", str(path), "--trainer.default_root_dir", str(run)])
    rows = ResultStore(run).rows()
    attacks = {r.attack for r in rows}
    assert {"CW-L2 (2-10)", "DR (4-10)"} <= attacks
    clean = [r for r in rows if r.attack == CLEAN]
    # one query per identity (max_queries_per_identity=1), each attacked by both attacks
    assert len(clean) >= 8 and len({r.identity for r in clean}) == len(clean)
    assert len(rows) == 3 * len(clean)
    assert all(r.linf <= 4 / 255 + 1e-6 for r in rows if r.attack == "DR (4-10)")

    # the kept adversarials (112 px ArcFace inputs) transfer to the other family (160 px)
    facenet = weight_file("facenet", tmp_path / "facenet.pt")
    args = ["transfer", str(run), "--target", "facenet_vggface2", "--weights", str(facenet)]
    assert main(args) == 0
    after = ResultStore(run).rows()
    moved = {r.attack: r for r in after if r.model == "facenet_vggface2"}
    for attack in ("CW-L2 (2-10)", "DR (4-10)"):
        name = f"{attack} @{clean[0].model}->facenet_vggface2"
        rows_of = [r for r in after if r.attack == name]
        assert len(rows_of) == len(clean), name  # every stored adversarial, evaluated once
        source = {r.sample_id: r for r in rows if r.attack == attack}
        assert all(r.l2 == source[r.sample_id].l2 for r in rows_of)  # the source's perturbation
    assert CLEAN in moved  # the new target's clean baseline


def test_dr_moves_arcface_features_towards_the_target(tmp_path, one_thread):
    model = build_model(
        "arcface_iresnet18", weights=str(weight_file("arcface", tmp_path / "w.pth"))
    )
    g = torch.Generator().manual_seed(8)
    source, other = torch.rand(1, 3, 112, 112, generator=g), torch.rand(1, 3, 112, 112, generator=g)
    with torch.no_grad():
        gallery = Gallery(
            torch.cat([model.features(source), model.features(other)]), torch.tensor([0, 1])
        )
    result = DeepRepresentation(epsilon=4 / 255, steps=3)(
        model, source, torch.tensor([1]), gallery=gallery
    )
    before = (gallery.features[0] - gallery.features[1]).norm()
    after = (result.extra["features"][0] - gallery.features[1]).norm()
    assert result.adversarial.shape == source.shape
    assert (result.adversarial - source).abs().max() <= 4 / 255 + 1e-6
    assert after < before  # L-BFGS-B only accepts steps that lower the distance


def test_cw_on_facenet_reads_the_same_logits_as_forward(tmp_path, one_thread):
    model = build_model("facenet_vggface2", weights=str(weight_file("facenet", tmp_path / "w.pt")))
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        label = model(x).argmax(1)
    result = CarliniWagnerL2(binary_search_steps=1, steps=3)(model, x, label)
    with torch.no_grad():
        logits = model(result.adversarial)
        features = model.features(result.adversarial)
    assert torch.allclose(result.extra["logits"], logits, atol=1e-5)
    assert torch.allclose(result.extra["features"], features, atol=1e-6)
    assert bool(result.success) == bool(logits.argmax(1) != label)


def test_gallery_classifier_over_arcface_is_differentiable(tmp_path, one_thread):
    model = build_model(
        "arcface_iresnet18", weights=str(weight_file("arcface", tmp_path / "w.pth"))
    )
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        templates = model.features(torch.rand(3, 3, 112, 112, generator=g))
    classifier = GalleryClassifier(model, templates)
    x = torch.rand(1, 3, 112, 112, generator=g).requires_grad_(True)
    classifier(x)[0, 1].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_readme_shows_the_arcface_example_config_as_it_is():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own model") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") :]
    block = block[: block.index("```")]
    config = (ROOT / "configs" / "examples" / "arcface_iresnet50.yaml").read_text()
    assert yaml.safe_load(block) == yaml.safe_load(config)
    for name in ("arcface_iresnet50.yaml", "facenet_vggface2.yaml"):
        assert f"configs/examples/{name}" in section


CR_FAMILIES = {"arcface_iresnet18": (112, "arcface"), "facenet_vggface2": (160, "facenet")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CR_FAMILIES))
def test_crossres_fit_trains_a_cr_student_of_each_family(name, tmp_path, one_thread):
    """``crossres fit`` with configs/examples/cr_arcface_iresnet50.yaml (label-free CR
    distillation on the embedded faces), its model swapped for each family's stand-in with a
    random weight file and 2 steps: the datamodule gets the model's input size, the exported
    student loads back into the registry model, it moved, and the teacher's file did not."""
    side, family = CR_FAMILIES[name]
    teacher = weight_file(family, tmp_path / "teacher.pt")
    before = sha256_file(teacher)
    cfg = yaml.safe_load((ROOT / "configs/examples/cr_arcface_iresnet50.yaml").read_text())
    assert cfg["model"]["init_args"]["model"] == "arcface_iresnet50"
    cfg["model"]["init_args"].update(model=name, weights=str(teacher))
    cfg["trainer"].update(max_epochs=1, limit_train_batches=2, enable_checkpointing=False)
    cfg["trainer"]["callbacks"] = [
        cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("StudentExport")
    ]
    cfg["data"]["init_args"]["source"]["init_args"]["batch_size"] = 4
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen = {}
    original = StudentExport.on_train_end

    def spying(self, trainer, pl_module):  # what the CLI built, at the end of fit
        seen["input_size"] = trainer.datamodule.source.input_size
        seen["resolutions"] = [r for _, _, r in pl_module.sampled]
        original(self, trainer, pl_module)

    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StudentExport, "on_train_end", spying)
        assert main(["fit", "--config", str(path), "--trainer.default_root_dir", str(run)]) == 0
    assert seen["input_size"] in (side, (side, side))
    assert len(seen["resolutions"]) == 2 and all(8 <= r < 128 for r in seen["resolutions"])
    student = build_model(name, weights=str(run / "student.pt"))
    original_model = build_model(name, weights=str(teacher))
    assert sha256_file(teacher) == before
    moved = [
        k
        for k, v in student.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, original_model.state_dict()[k])
    ]
    assert moved, "two SGD steps changed no weight"
    assert not any("logits" in k for k in moved), moved  # frozen when label-free
    # freeze_batchnorm: the running statistics are the teacher's
    assert not any("running_" in k for k in moved), moved
