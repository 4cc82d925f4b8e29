"""Kept adversarial images (crossres.adversarial_store): exact uint8 round trips, float16
within the error the file states (and within float16's analytic half-ulp), the delta
encoding never worse than plain float16, one file per shape, duplicates dropped on read,
a writer SIGKILLed mid-loop then resumed, files read with numpy alone, and uint8 size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crossres import adversarial_store
from crossres.adversarial_store import AdversarialImageStore
from crossres.errors import CrossresError

SRC = Path(__file__).parents[1] / "src"
# float16 round-to-nearest of a value in [0, 1]: the widest spacing there is 2**-11 ([0.5, 1))
F16_HALF_ULP = 2.0**-12

shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 6), st.integers(1, 6))


def keys_for(n: int, *, model: str = "base", attack: str = "pgd", first: int = 0, res: int = 16):
    return [(model, attack, first + i, res) for i in range(n)]


def only_file(run_dir: Path) -> Path:
    (path,) = AdversarialImageStore(run_dir).files()
    return path


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_uint8_representable_images_round_trip_exactly(tmp_path_factory, data):
    shape = data.draw(shapes)
    pixels = data.draw(hnp.arrays(np.uint8, shape))
    images = torch.from_numpy(pixels).to(torch.float32) / 255  # what ToTensor makes of PIL
    run = tmp_path_factory.mktemp("run")
    store = AdversarialImageStore(run)
    keys = keys_for(shape[0])
    assert store.writer(0).write(keys, images, space="model_input") == shape[0]

    z = np.load(only_file(run))
    assert str(z["encoding"]) == "uint8" and bool(z["exact"])
    np.testing.assert_array_equal(z["images"], pixels)
    assert torch.equal(store.load(keys), images)
    ((got_keys, got, meta),) = list(store.iter_batches())
    assert got_keys == keys and torch.equal(got, images)
    assert meta["exact"] and meta["max_abs_error"] <= adversarial_store.EXACT_TOLERANCE


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_other_images_round_trip_within_the_stated_float16_error(tmp_path_factory, data):
    shape = data.draw(shapes)
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    images = torch.from_numpy(values)
    run = tmp_path_factory.mktemp("run")
    store = AdversarialImageStore(run)
    keys = keys_for(shape[0])
    store.writer(0).write(keys, images, space="low_resolution")

    ((_, got, meta),) = list(store.iter_batches())
    error = (got.double() - images.double()).abs().max().item()
    assert got.dtype == torch.float32 and got.min() >= 0 and got.max() <= 1
    assert meta["space"] == "low_resolution" and meta["shape"] == shape[1:]
    assert error == meta["max_abs_error"]  # the stated error is the measured one
    if meta["encoding"] == "uint8":  # hypothesis likes 0 and 1, which are pixels
        assert meta["exact"] and error <= adversarial_store.EXACT_TOLERANCE
    else:
        assert meta["encoding"] == "float16" and not meta["exact"]
        assert error <= F16_HALF_ULP


@settings(max_examples=40, deadline=None)
@given(data=st.data(), eps=st.floats(1e-4, 0.2))
def test_delta_encoding_is_kept_only_when_more_precise(tmp_path_factory, data, eps):
    shape = data.draw(shapes)
    pixels = data.draw(hnp.arrays(np.uint8, shape))
    noise = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    clean = torch.from_numpy(pixels).to(torch.float32) / 255
    adv = (clean + eps * torch.from_numpy(noise)).clamp(0, 1)
    run = tmp_path_factory.mktemp("run")
    store = AdversarialImageStore(run)
    keys = keys_for(shape[0])
    store.writer(0).write(keys, adv, space="model_input", clean=clean)

    ((_, got, meta),) = list(store.iter_batches())
    error = (got.double() - adv.double()).abs().max().item()
    plain_f16 = (adv.half().double() - adv.double()).abs().max().item()
    assert error == meta["max_abs_error"]
    assert error <= plain_f16  # never worse than storing the image as float16
    if meta["encoding"] == "uint8+float16_delta":
        assert error < plain_f16
        # float16 half-ulp of the perturbation, plus float32 roundings of base + delta
        delta = (adv.double() - clean.double()).abs().max().item()
        assert error <= delta * 2.0**-11 + 2.0**-23
        assert "delta" in np.load(meta["path"]).files


def test_small_perturbations_choose_the_delta_encoding_and_gain_precision(tmp_path):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (4, 3, 16, 16), generator=g).float() / 255
    adv = (clean + 0.01 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    store = AdversarialImageStore(tmp_path)
    store.writer(0).write(keys_for(4), adv, space="model_input", clean=clean)
    ((_, got, meta),) = list(store.iter_batches())
    plain_f16 = (adv.half().float() - adv).abs().max().item()
    assert meta["encoding"] == "uint8+float16_delta"
    # |delta| <~ 0.04 against values up to 1: float16's relative step gives ~20x
    assert meta["max_abs_error"] < plain_f16 / 8


def test_mixed_shapes_in_one_call_are_split_into_one_file_per_shape(tmp_path):
    g = torch.Generator().manual_seed(1)
    shapes_in = [(3, 16, 16), (3, 24, 20), (3, 16, 16), (3, 24, 20), (3, 16, 16)]
    images = [torch.rand(s, generator=g) for s in shapes_in]
    keys = keys_for(5, res=0)
    store = AdversarialImageStore(tmp_path)
    assert store.writer(0).write(keys, images, space="low_resolution") == 5

    assert len(store.files()) == 2
    batches = {meta["shape"]: (k, x) for k, x, meta in store.iter_batches()}
    assert sorted(batches) == [(3, 16, 16), (3, 24, 20)]
    k16, x16 = batches[(3, 16, 16)]
    assert k16 == [keys[0], keys[2], keys[4]]  # batch order kept within a shape
    for i, k in zip([0, 2, 4], k16, strict=True):
        assert (x16[k16.index(k)] - images[i]).abs().max() <= F16_HALF_ULP
    assert store.load([keys[3], keys[1]]).shape == (2, 3, 24, 20)
    with pytest.raises(CrossresError, match="different shapes"):
        store.load([keys[0], keys[1]])


def test_duplicate_keys_are_dropped_on_read_and_skipped_on_write(tmp_path):
    store = AdversarialImageStore(tmp_path)
    first = torch.full((2, 1, 2, 2), 10 / 255)
    other = torch.full((2, 1, 2, 2), 20 / 255)
    keys = keys_for(2)
    assert store.writer(0).write(keys, first, space="model_input") == 2
    assert store.writer(0).write(keys, other, space="model_input") == 0  # rank 0 holds them
    assert len(store.files()) == 1
    # another rank (DistributedSampler padding) writes one of them again, plus a new key
    both = [keys[1], ("base", "pgd", 7, 16)]
    assert store.writer(1).write(both, other, space="model_input") == 2
    # and a batch repeating a key within itself
    rep = [("base", "pgd", 8, 16)] * 2
    assert store.writer(1).write(rep, other, space="model_input") == 1

    assert store.done_keys() == {*keys, ("base", "pgd", 7, 16), ("base", "pgd", 8, 16)}
    seen = [k for ks, _, _ in store.iter_batches() for k in ks]
    assert sorted(seen) == sorted(store.done_keys())  # each key once
    assert torch.equal(store.load([keys[1]]), first[1:])  # rank-0 file comes first
    assert [ks for ks, _, _ in store.iter_batches(attack="cw")] == []
    assert [ks for ks, _, _ in store.iter_batches(model="base", attack="pgd")]


def test_rewriting_a_batch_from_a_fresh_process_replaces_its_file_with_itself(tmp_path):
    images = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    store = AdversarialImageStore(tmp_path)
    store.writer(0).write(keys_for(3), images, space="model_input")
    (path,) = store.files()
    before = path.read_bytes()
    path.rename(path.with_suffix(".npz.bak"))  # the writer's memory of it is gone
    store.writer(0).write(keys_for(3), images, space="model_input")
    assert [p.name for p in store.files()] == [path.name]
    assert path.read_bytes() == before


def test_bad_input_raises_errors_naming_it(tmp_path):
    w = AdversarialImageStore(tmp_path).writer(0)
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="space"):
        w.write(keys_for(2), x, space="pixel")
    with pytest.raises(ValueError, match="one key per image"):
        w.write(keys_for(3), x, space="model_input")
    with pytest.raises(ValueError, match=r"images\[1\].*\[0, 1\]"):
        w.write(keys_for(2), torch.stack([x[0], x[1] + 1]), space="model_input")
    with pytest.raises(ValueError, match=r"images\[0\]"):
        w.write(keys_for(2), torch.stack([x[0] * float("nan"), x[1]]), space="model_input")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        w.write(keys_for(2), x[0], space="model_input")
    with pytest.raises(ValueError, match=r"clean\[0\] has shape"):
        w.write(keys_for(2), x, space="model_input", clean=x[:, :, :2])
    with pytest.raises(ValueError, match="key is"):
        w.write([("base", "pgd", 1)] * 2, x, space="model_input")
    with pytest.raises(CrossresError, match="no stored adversarial"):
        AdversarialImageStore(tmp_path).load([("base", "pgd", 0, 16)])
    assert AdversarialImageStore(tmp_path).files() == []


def test_a_damaged_file_is_reported_by_path(tmp_path):
    store = AdversarialImageStore(tmp_path)
    store.writer(0).write(keys_for(2), torch.rand(2, 3, 4, 4), space="model_input")
    (path,) = store.files()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CrossresError, match=path.name):
        store.done_keys()


def snippet() -> str:
    """The numpy-only reading code of the module docstring, as written there."""
    doc = adversarial_store.__doc__
    block = doc.split("Reading a batch with numpy only::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def test_the_docstring_snippet_reads_files_with_numpy_only(tmp_path):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 256, (3, 3, 6, 6), generator=g).float() / 255
    store = AdversarialImageStore(tmp_path / "run")
    w = store.writer(0)
    w.write(keys_for(3, first=0), clean, space="model_input")  # uint8
    w.write(keys_for(3, first=10), torch.rand(3, 3, 6, 6, generator=g), space="low_resolution")
    adv = (clean + 0.01 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    w.write(keys_for(3, first=20), adv, space="model_input", clean=clean)  # delta
    paths = store.files()
    assert sorted(str(np.load(p)["encoding"]) for p in paths) == sorted(
        ["uint8", "float16", "uint8+float16_delta"]
    )
    assert len(snippet().strip().splitlines()) == 5

    # a bare interpreter where importing crossres or torch fails: numpy alone must do
    program = "\n".join(
        [
            "import sys",
            "sys.modules['crossres'] = None",
            "sys.modules['torch'] = None",
            "import numpy as np",
            "for n, path in enumerate(sys.argv[2:]):",
            textwrap.indent(snippet(), "    "),
            "    np.save(f'{sys.argv[1]}/x{n}.npy', x)",
            "    np.save(f'{sys.argv[1]}/k{n}.npy', keys)",
        ]
    )
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-I", "-c", program, str(out), *map(str, paths)],
        check=True,
        timeout=120,
    )
    for n, path in enumerate(paths):
        ((keys, images, _),) = [b for b in store.iter_batches() if b[2]["path"] == path]
        x = np.load(out / f"x{n}.npy")
        k = np.load(out / f"k{n}.npy")
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, images.numpy())
        assert [(str(m), str(a), int(s), int(r)) for m, a, s, r in k.tolist()] == keys


def test_a_uint8_batch_takes_a_quarter_of_float32(tmp_path):
    images = torch.randint(0, 256, (8, 3, 64, 64)).float() / 255
    store = AdversarialImageStore(tmp_path)
    store.writer(0).write(keys_for(8), images, space="model_input")
    (path,) = store.files()
    reference = tmp_path / "float32.npy"
    np.save(reference, images.numpy())
    ratio = path.stat().st_size / reference.stat().st_size
    # 1 byte vs 4 per value; the keys and small members add ~2 kB to 393 kB
    assert 0.25 <= ratio < 0.26, ratio


# A writer of deterministic batches. With a 4th argument b, its b-th write announces itself
# and stalls once the bytes are on disk but before the rename (at fsync): the SIGKILL then
# lands inside the write, the moment a non-atomic writer would leave a half file.
CHILD = """
import os, sys, time
import torch
from crossres.adversarial_store import AdversarialImageStore

torch.set_num_threads(1)
run_dir, n_batches, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stall_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
writer = AdversarialImageStore(run_dir).writer(0)
fsync = os.fsync
for b in range(n_batches):
    keys = [("base", "cw", 4 * b + i, 24) for i in range(4)]
    images = torch.stack(
        [torch.rand(3, size, size, generator=torch.Generator().manual_seed(k[2])) for k in keys]
    )
    if b == stall_at:
        def stall(fd):
            fsync(fd)
            print("inside write", b, flush=True)
            time.sleep(600)
        os.fsync = stall
    writer.write(keys, images, space="model_input")
    os.fsync = fsync
print("done", flush=True)
"""


def expected_image(sample_id: int, size: int) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(sample_id))


def test_sigkill_mid_loop_then_resume_leaves_complete_batches_and_no_duplicates(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run, n_batches, size = tmp_path / "run", 12, 96
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, str(script), str(run), str(n_batches), str(size)]
    child = subprocess.Popen([*cmd, "4"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "inside write 4":
                child.send_signal(signal.SIGKILL)
                break
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    store = AdversarialImageStore(run)
    killed = store.files()
    assert len(killed) == 4  # batches 0-3; batch 4 only as the temporary file it died in
    assert len(list((run / "adversarials" / "rank-0").glob(".*.tmp"))) == 1
    assert len(store.done_keys()) == 16
    for path in killed:  # every file present is whole
        ((keys, images, meta),) = [b for b in store.iter_batches() if b[2]["path"] == path]
        assert len(keys) == 4
        for k, x in zip(keys, images, strict=True):
            assert (x - expected_image(k[2], size)).abs().max() <= meta["max_abs_error"]

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "adversarials" / "rank-0").glob(".*.tmp"))
    files = store.files()
    assert len(files) == n_batches
    raw = [k for p in files for k in adversarial_store._read_keys(p)]
    assert len(raw) == len(set(raw)) == 4 * n_batches  # each key in exactly one file
    assert store.done_keys() == {("base", "cw", i, 24) for i in range(4 * n_batches)}
    ids = list(range(4 * n_batches))
    got = store.load([("base", "cw", i, 24) for i in ids])
    want = torch.stack([expected_image(i, size) for i in ids])
    assert (got - want).abs().max() <= F16_HALF_ULP
