"""Regenerate ``tests/fixtures/foolbox_jsma/``: foolbox 2.4.0's own SaliencyMapAttack outputs,
which ``tests/test_foolbox_jsma_fixture.py`` compares with ``crossres.attacks.JSMA``.

foolbox 2.4.0 goes into a temporary ``--target`` folder (``pip install --no-deps``; whatever of
its imports the running environment lacks is added to that folder the same way), never into
the environment itself. For each case a tiny conv net is built from a seed, inputs are drawn
from the same seed (a few components saturated at 1 so steps hit a bound), and foolbox's
``SaliencyMapAttack(fast=True)`` with its default untargeted target choice (GradientAttack
scan, ``num_random_targets=0``) attacks each sample alone. Written:

- ``foolbox_jsma.npz``: per case ``<case>_x`` (inputs), ``<case>_labels``, the net's weights
  (``<case>_conv_weight`` ...), ``<case>_success`` and ``<case>_adversarial`` (NaN where
  foolbox found nothing);
- ``foolbox_jsma.json``: versions (foolbox, numpy, scipy, torch, python), the pip command, the
  exact attack call, the architecture, the cases, and the sha256 of the npz.

Usage (from the repository root, a few minutes on one core):
    .venv/bin/python scripts/make_foolbox_fixture.py [--out tests/fixtures/foolbox_jsma]
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import importlib
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossres.io import atomic_write_bytes, atomic_write_json

FOOLBOX = "foolbox==2.4.0"
# foolbox 2.4.0's install_requires, as module name -> distribution name; only the missing
# ones are installed (setuptools provides pkg_resources).
REQUIRES = {
    "numpy": "numpy",
    "scipy": "scipy",
    "pkg_resources": "setuptools",
    "requests": "requests",
    "git": "GitPython",
}
SIZE = 6  # input side: 3 x 6 x 6 images
CASES = (
    # name, classes, theta, max_perturbations_per_pixel, max_iter, seed, samples
    ("c10_t01_p10", 10, 0.1, 10, 100, 1, 16),
    ("c100_t03_p3", 100, 0.3, 3, 100, 2, 16),
    ("c2_t05_p10", 2, 0.5, 10, 100, 3, 16),
    ("c50_t01_p2_short", 50, 0.1, 2, 12, 4, 16),  # small budgets: failures too
)
ARCHITECTURE = (
    f"nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), "
    f"nn.Linear(4 * {SIZE} * {SIZE}, classes)); float32, eval()"
)
CALL = (
    "foolbox.attacks.SaliencyMapAttack(fmodel, criterion=foolbox.criteria.Misclassification())"
    "(x[i:i+1], labels[i:i+1], unpack=False, max_iter=max_iter, theta=theta, "
    "max_perturbations_per_pixel=max_perturbations_per_pixel, fast=True, "
    "num_random_targets=0)[0].perturbed; fmodel = foolbox.models.PyTorchModel(Float32(net), "
    "bounds=(0, 1), num_classes=classes), Float32 casting its input to float32 (foolbox's "
    "GradientAttack scan hands float64 candidates to the model under numpy 2)"
)


def tiny_net(classes: int, *, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, classes)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


def seeded_inputs(samples: int, *, seed: int) -> torch.Tensor:
    x = torch.rand(samples, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1000 + seed))
    x[:2, :, 1:4] = 1.0  # saturated components: the first steps there go past a bound
    return x


class Float32(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def _pip(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *args]
    subprocess.run(cmd, check=True)
    return cmd


def install_foolbox(target: Path) -> list[str]:
    """foolbox 2.4.0 plus any of its imports this interpreter lacks, into ``target``;
    returns the pip command lines run."""
    commands = [_pip("--target", str(target), FOOLBOX)]
    missing = []
    for module, dist in REQUIRES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        commands.append(_pip("--target", str(target), *missing))
    return commands


def import_foolbox(target: Path):
    # foolbox 2 predates Python 3.10, which removed these aliases from ``collections``.
    for name in ("Mapping", "Iterable", "Sequence"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    sys.path.insert(0, str(target))
    import foolbox

    if foolbox.__version__ != "2.4.0" or not str(foolbox.__file__).startswith(str(target)):
        raise RuntimeError(f"imported foolbox {foolbox.__version__} from {foolbox.__file__}")
    return foolbox


def run_case(foolbox, case: tuple) -> dict[str, np.ndarray]:
    name, classes, theta, maxpp, max_iter, seed, samples = case
    net = tiny_net(classes, seed=seed)
    x = seeded_inputs(samples, seed=seed)
    with torch.no_grad():
        labels = net(x).argmax(1)
    fmodel = foolbox.models.PyTorchModel(Float32(net).eval(), bounds=(0, 1), num_classes=classes)
    adversarial = np.full(x.shape, np.nan, dtype=np.float32)
    success = np.zeros(samples, dtype=bool)
    for i in range(samples):
        attack = foolbox.attacks.SaliencyMapAttack(
            fmodel, criterion=foolbox.criteria.Misclassification()
        )
        adv = attack(
            x[i : i + 1].numpy(),
            labels[i : i + 1].numpy(),
            unpack=False,
            max_iter=max_iter,
            theta=theta,
            max_perturbations_per_pixel=maxpp,
            fast=True,
            num_random_targets=0,
        )[0]
        if adv.perturbed is not None:
            success[i] = True
            adversarial[i] = adv.perturbed
    out = {f"{name}_{k}": v.detach().numpy() for k, v in _weights(net).items()}
    out[f"{name}_x"] = x.numpy()
    out[f"{name}_labels"] = labels.numpy()
    out[f"{name}_success"] = success
    out[f"{name}_adversarial"] = adversarial
    return out


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    conv, fc = net[0], net[3]
    return {
        "conv_weight": conv.weight,
        "conv_bias": conv.bias,
        "fc_weight": fc.weight,
        "fc_bias": fc.bias,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/foolbox_jsma")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="foolbox2-") as tmp:
        commands = install_foolbox(Path(tmp))
        foolbox = import_foolbox(Path(tmp))
        foolbox.set_seeds(0)  # only its random-target fallback draws; recorded below if used
        import scipy

        arrays: dict[str, np.ndarray] = {}
        start = time.perf_counter()
        for case in CASES:
            arrays.update(run_case(foolbox, case))
            done = arrays[f"{case[0]}_success"]
            print(f"{case[0]}: foolbox succeeded on {int(done.sum())}/{done.size}")
        seconds = time.perf_counter() - start
        versions = {
            "foolbox": foolbox.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    digest = atomic_write_bytes(out / "foolbox_jsma.npz", buf.getvalue())
    record = {
        "made_by": "scripts/make_foolbox_fixture.py",
        "versions": versions,
        "pip": [" ".join(c[c.index("pip") :]).replace(tmp, "<tmp>") for c in commands],
        "call": CALL,
        "architecture": ARCHITECTURE,
        "weights_init": "torch.randn(shape, generator=Generator().manual_seed(seed)) * 0.5, "
        "parameters in order",
        "inputs": f"torch.rand(samples, 3, {SIZE}, {SIZE}, generator=manual_seed(1000 + seed)); "
        "x[:2, :, 1:4] = 1; labels = net(x).argmax(1)",
        "cases": [
            dict(
                zip(
                    ("name", "classes", "theta", "max_perturbations_per_pixel", "max_iter"),
                    case[:5],
                    strict=True,
                ),
                seed=case[5],
                samples=case[6],
            )
            for case in CASES
        ],
        "foolbox_seconds": round(seconds, 1),
        "npz_sha256": digest,
    }
    atomic_write_json(out / "foolbox_jsma.json", record)
    print(f"wrote {out}/foolbox_jsma.npz ({len(buf.getvalue())} bytes, sha256 {digest[:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
