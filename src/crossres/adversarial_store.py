"""Kept adversarial images: one plain ``.npz`` per attacked batch, beside the result store.

Keyed like the result rows, ``(model, attack, sample_id, resolution)``, plus the ``space`` the
attack worked in (``model_input`` or ``low_resolution``) and the image shape. Files live under
``<run_dir>/adversarials/rank-<r>/<hash>.npz``; a batch whose samples have different shapes
(low-resolution images of several sizes) is split into one file per shape.

Crash safety without an index: the file is the unit. Each one is written atomically
(``crossres.io.atomic_write_bytes``: temporary file, fsync, rename), so a SIGKILL leaves a file
complete or absent, never half; readers scan the files, and a new writer deletes the
temporary leftovers of its rank. A file is named by a hash of its space, shape and keys, so
rewriting the same batch replaces it with itself. A writer skips the keys its rank already
holds (``INSERT OR IGNORE``, as the result store), and readers merge every rank dropping
duplicate keys (DistributedSampler padding, a batch redone after a crash): the first file
in path order wins. ``done_keys()`` is what a resumed run skips.

Encoding, chosen per file (``encoding``):

- ``uint8``: every pixel is within 1e-6 of a multiple of 1/255 (PIL pixels, or an attack
  that rounds to them); stored as ``round(x * 255)``, ``exact=True``, 1 byte per value.
- ``float16``: anything else; 2 bytes per value, ``max_abs_error`` measured on the batch
  (at most 2**-12 in [0, 1]).
- ``uint8+float16_delta``: when the writer is given the clean images, they are uint8-exact
  and the adversarial is not, the file may instead hold the clean image as uint8 plus the
  perturbation as float16. It costs 3 bytes per value instead of 2, and is chosen only when
  its measured error is smaller than plain float16's: float16 is relative, so a small
  perturbation (|delta| <= 0.03) is kept ~10x more precisely than the image itself, which
  matters for minimal attacks (CW, DeepFool) whose adversarials sit on a decision boundary.

Members of every file (plain arrays, no pickle): ``keys`` (structured: ``model``, ``attack``
strings, ``sample_id``, ``resolution`` int64), ``images`` (uint8 or float16, [B, C, H, W]),
``scale`` (float32: 255 for uint8 images, 1 for float16), ``delta`` (float16, only in the
delta encoding), ``space``, ``encoding`` (strings), ``exact`` (bool), ``max_abs_error``
(float64: max |decoded - written| over the file, measured on the decode below).

Reading a batch with numpy only::

    import numpy as np
    z = np.load(path)  # a plain .npz: no pickle, no crossres
    x = z["images"].astype(np.float32) / z["scale"]  # uint8 / 255, or float16 / 1
    x = np.clip(x + z["delta"] if "delta" in z.files else x, 0.0, 1.0)  # [B, C, H, W]
    keys = z["keys"]  # keys["model"], keys["attack"], keys["sample_id"], keys["resolution"]

"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossres.errors import CrossresError
from crossres.io import CorruptFileError, atomic_write_bytes, json_hash

Key = tuple[str, str, int, int]
SPACES = ("model_input", "low_resolution")
UINT8, FLOAT16, DELTA = "uint8", "float16", "uint8+float16_delta"
EXACT_TOLERANCE = 1e-6  # a pixel this close to k/255 is PIL's pixel k
# what numpy raises on a damaged .npz (a file written here is complete; a disk may not be)
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class AdversarialImageStore:
    """Every kept adversarial of one run directory (``<run_dir>/adversarials/rank-*/``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / "adversarials"
        self._index: dict[Key, tuple[Path, int]] | None = None

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("rank-*/*.npz")) if self.dir.is_dir() else []

    def writer(self, rank: int = 0) -> AdversarialWriter:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        return AdversarialWriter(self.dir / f"rank-{rank}")

    def done_keys(self) -> set[Key]:
        """Keys stored by any process (what a resumed run skips); read afresh on every call."""
        return {k for path in self.files() for k in _read_keys(path)}

    def iter_batches(
        self, model: str | None = None, attack: str | None = None
    ) -> Iterator[tuple[list[Key], torch.Tensor, dict[str, Any]]]:
        """``(keys, images, meta)`` per stored file, restricted to ``model``/``attack`` when
        given, each key once over the whole iteration. ``images``: float32 [n, C, H, W] in
        [0, 1]; ``meta``: space, encoding, exact, max_abs_error, shape (C, H, W), path."""
        seen: set[Key] = set()
        for path in self.files():
            keys = _read_keys(path)
            pick = [
                i
                for i, k in enumerate(keys)
                if k not in seen
                and (model is None or k[0] == model)
                and (attack is None or k[1] == attack)
            ]
            if not pick:
                continue
            images, meta = _read_images(path)
            chosen = [keys[i] for i in pick]
            seen.update(chosen)
            yield chosen, torch.from_numpy(images[pick]), meta

    def load(self, keys: Sequence[Key]) -> torch.Tensor:
        """The stored images of ``keys``, in that order: float32 [N, C, H, W] in [0, 1]."""
        wanted = [_key(k) for k in keys]
        index = self._index if self._index is not None else self._build_index()
        if any(k not in index for k in wanted):  # files written since the index was built
            index = self._build_index()
        missing = [k for k in wanted if k not in index]
        if missing:
            raise CrossresError(
                f"no stored adversarial image for {len(missing)} key(s) in {self.dir}, "
                f"e.g. {missing[:3]}"
            )
        by_file: dict[Path, list[int]] = {}
        for n, k in enumerate(wanted):
            by_file.setdefault(index[k][0], []).append(n)
        out: dict[int, np.ndarray] = {}
        for path, positions in by_file.items():
            images, _ = _read_images(path)
            for n in positions:
                out[n] = images[index[wanted[n]][1]]
        shapes = sorted({a.shape for a in out.values()})
        if len(shapes) > 1:
            raise CrossresError(
                f"the requested keys have images of different shapes {shapes}: load them "
                "in groups of one shape (iter_batches yields one shape per batch)"
            )
        if not out:
            return torch.empty(0, dtype=torch.float32)
        return torch.from_numpy(np.stack([out[n] for n in range(len(wanted))]))

    def _build_index(self) -> dict[Key, tuple[Path, int]]:
        index: dict[Key, tuple[Path, int]] = {}
        for path in self.files():
            for i, k in enumerate(_read_keys(path)):
                index.setdefault(k, (path, i))  # first file wins, as in iter_batches
        self._index = index
        return index


class AdversarialWriter:
    """One process's writer; ``write`` is called once per attacked batch."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        # Only this rank writes here: a temporary file is the remains of a killed write.
        for leftover in self.dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        self._done = {k for path in sorted(self.dir.glob("*.npz")) for k in _read_keys(path)}

    def write(
        self,
        keys: Sequence[Key],
        images: torch.Tensor | Sequence[torch.Tensor],
        *,
        space: str,
        clean: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> int:
        """Keep one batch. ``images``: [B, C, H, W] in [0, 1] on any device, or B tensors
        [C, H, W] of possibly different shapes (one file per shape). ``clean``: the same
        layout, optional, enables the delta encoding. Keys this rank already holds, and
        repeats within the batch, are skipped. Returns the number of samples written."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        keys = [_key(k) for k in keys]
        adv = _to_numpy(images, "images")
        if len(adv) != len(keys):
            raise ValueError(f"{len(keys)} keys for {len(adv)} images: one key per image")
        base = None if clean is None else _to_numpy(clean, "clean")
        if base is not None:
            if len(base) != len(adv):
                raise ValueError(f"clean has {len(base)} images, images has {len(adv)}")
            for i, (a, c) in enumerate(zip(adv, base, strict=True)):
                if a.shape != c.shape:
                    raise ValueError(f"clean[{i}] has shape {c.shape}, images[{i}] {a.shape}")
        groups: dict[tuple[int, ...], list[int]] = {}
        fresh: set[Key] = set()
        for i, k in enumerate(keys):
            if k in self._done or k in fresh:
                continue
            fresh.add(k)
            groups.setdefault(adv[i].shape, []).append(i)
        for shape, idx in groups.items():
            x = np.stack([adv[i] for i in idx])
            c = None if base is None else np.stack([base[i] for i in idx])
            batch_keys = [keys[i] for i in idx]
            members = {"keys": _keys_array(batch_keys), "space": np.array(space)}
            members.update(encode(x, c))
            name = json_hash([space, list(shape), [list(k) for k in batch_keys]])[:32]
            buffer = io.BytesIO()
            np.savez(buffer, **members)
            atomic_write_bytes(self.dir / f"{name}.npz", buffer.getvalue())
            self._done.update(batch_keys)
        return len(fresh)


def encode(x: np.ndarray, clean: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The members ``images``, ``scale``, [``delta``], ``encoding``, ``exact`` and
    ``max_abs_error`` that keep ``x`` (float64 [B, C, H, W] in [0, 1]) most compactly when
    exact, else most precisely."""
    q = np.rint(x * 255.0)
    if np.abs(x - q / 255.0).max(initial=0.0) <= EXACT_TOLERANCE:
        return _finish(x, UINT8, images=q.astype(np.uint8), scale=np.float32(255.0))
    best = _finish(x, FLOAT16, images=x.astype(np.float16), scale=np.float32(1.0))
    if clean is not None:
        cq = np.rint(clean * 255.0)
        if np.abs(clean - cq / 255.0).max(initial=0.0) <= EXACT_TOLERANCE:
            b8 = cq.astype(np.uint8)
            b32 = b8.astype(np.float32) / np.float32(255.0)  # what decode adds back
            delta = (x - b32).astype(np.float16)
            alt = _finish(x, DELTA, images=b8, scale=np.float32(255.0), delta=delta)
            if alt["max_abs_error"] < best["max_abs_error"]:
                best = alt
    return best


def decode(z: Any) -> np.ndarray:
    """float32 [B, C, H, W] in [0, 1] from a file's members: the docstring's numpy snippet."""
    x = z["images"].astype(np.float32) / z["scale"]
    return np.clip(x + z["delta"] if "delta" in _names(z) else x, 0.0, 1.0)


def _finish(x: np.ndarray, encoding: str, **members: np.ndarray) -> dict[str, np.ndarray]:
    error = float(np.abs(decode(members).astype(np.float64) - x).max(initial=0.0))
    return {
        **members,
        "encoding": np.array(encoding),
        "exact": np.array(encoding == UINT8),
        "max_abs_error": np.array(error, dtype=np.float64),
    }


def _names(z: Any) -> Sequence[str]:
    return z.files if hasattr(z, "files") else list(z)


def _key(k: Sequence) -> Key:
    if len(k) != 4:
        raise ValueError(f"a key is (model, attack, sample_id, resolution), got {k!r}")
    model, attack, sample_id, resolution = k
    if not isinstance(model, str) or not isinstance(attack, str):
        raise ValueError(f"model and attack of a key must be strings, got {k!r}")
    return (model, attack, int(sample_id), int(resolution))


def _keys_array(keys: list[Key]) -> np.ndarray:
    width_m = max(1, *(len(k[0]) for k in keys))
    width_a = max(1, *(len(k[1]) for k in keys))
    dtype = np.dtype(
        [
            ("model", f"<U{width_m}"),
            ("attack", f"<U{width_a}"),
            ("sample_id", "<i8"),
            ("resolution", "<i8"),
        ]
    )
    return np.array(keys, dtype=dtype)


def _to_numpy(images: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[np.ndarray]:
    """Per-sample float64 arrays [C, H, W]; a batched tensor crosses to the CPU once."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(images.shape)}")
        whole = images.detach().to("cpu").to(torch.float64).numpy()
        arrays = list(whole)
    else:
        arrays = []
        for i, t in enumerate(images):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name}[{i}] must be a [C, H, W] tensor")
            arrays.append(t.detach().to("cpu").to(torch.float64).numpy())
    for i, a in enumerate(arrays):
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise ValueError(
                f"{name}[{i}] must be finite and in [0, 1], got range "
                f"[{a.min():.6g}, {a.max():.6g}]"
            )
    return arrays


def _load(path: Path) -> Any:
    try:
        return np.load(path)
    except _UNREADABLE as err:
        raise CorruptFileError(
            f"adversarial file {path} is unreadable ({err}); delete it and rerun"
        ) from err


def _read_keys(path: Path) -> list[Key]:
    with _load(path) as z:
        try:
            return [(str(m), str(a), int(s), int(r)) for m, a, s, r in z["keys"].tolist()]
        except _UNREADABLE as err:
            raise CorruptFileError(f"adversarial file {path} has no readable keys ({err})") from err


def _read_images(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with _load(path) as z:
        try:
            images = decode(z)
            meta = {
                "space": str(z["space"]),
                "encoding": str(z["encoding"]),
                "exact": bool(z["exact"]),
                "max_abs_error": float(z["max_abs_error"]),
                "shape": tuple(images.shape[1:]),
                "path": path,
            }
        except _UNREADABLE as err:
            raise CorruptFileError(f"adversarial file {path} is unreadable ({err})") from err
    return images, meta
