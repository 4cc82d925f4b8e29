"""Deep-representation attack (Sabour et al. 2016) guided by a gallery k-NN, as in the paper.

Impersonation: minimise ``||phi(x') - t||^2`` where ``t`` is the target identity's gallery
template (``Impersonation.anchor()``); dodging: minimise ``-||phi(x') - s||^2`` with ``s`` the
sample's own template (leave it as far as the box allows). Subject to ``|x' - x|_inf <=
epsilon`` and ``x'`` in [0, 1], which are per-pixel box bounds
``[max(0, x - eps), min(1, x + eps)]``, so the optimiser is L-BFGS-B (scipy's, the paper's
L-BFGS with box constraints). With ``metric="cosine"`` the distance is taken between
L2-normalised features (``2 - 2 cos``), matching what the k-NN then reads.

Stop: every point L-BFGS-B evaluates (iterates and line-search trials, all inside the box)
has its features checked by the gallery k-NN; the sample stops at the first point the k-NN
assigns to the target (impersonation) or to anyone else (dodging) and returns it. Otherwise
it runs until ``steps`` L-BFGS-B iterations (``maxiter``), ``max_evaluations`` function
evaluations (``maxfun``; default ``2 * steps + 10``: L-BFGS-B usually needs 1-1.3 per
iteration, the cap bounds a sample's cost when line searches struggle; as in scipy it is
checked when an iteration ends, so a last line search may add up to 20 more), or scipy's own
convergence tests (default ``ftol``/``gtol``), and returns its last iterate.
``iterations`` reports completed L-BFGS-B iterations, or the one in progress when the k-NN
accepted (0: the source itself); ``extra["evaluations"]`` the function evaluations.
Dodging from a feature that sits exactly on its own template has a zero gradient, and
L-BFGS-B stops at once (gallery templates are means over other images, so in practice the
feature is off its template).

Batching: each sample has its own scipy L-BFGS-B, so its path is exactly the one it would
take alone, and all live samples are evaluated together, one batched forward+backward per
round, in the calling thread (where grad mode and the model live); finished samples leave.
L-BFGS-B runs on the host, so each round copies its answers (loss, k-NN verdict, gradient)
to the host once, in one transfer.
With scipy >= 1.15 the samples' L-BFGS-B states are driven through scipy's own
reverse-communication routine (``setulb``, the loop of ``scipy.optimize.minimize``
replicated, including its ``maxiter``/``maxfun`` checks and its cache of the last point), so
no threads are needed. On older scipy each sample runs ``scipy.optimize.minimize`` in its own
thread, and a shared oracle gathers the pending requests of all live optimisers into the
same batched passes (slower per round: thread hand-offs).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, minimize
from torch import nn

from crossres.attacks.base import Attack, AttackResult, check_autocast, positive
from crossres.attacks.objectives import Dodging
from crossres.errors import ConfigValueError

_STATS = threading.local()

#: scipy's L-BFGS-B defaults (``scipy.optimize.minimize(method="L-BFGS-B")``)
_FTOL = 2.2204460492503131e-09
_GTOL = 1e-5
_MAXLS = 20


def _setulb():
    """scipy's reverse-communication L-BFGS-B step (scipy >= 1.15), or None."""
    try:
        import scipy
        from scipy.optimize import _lbfgsb
    except ImportError:  # pragma: no cover - scipy is a dependency
        return None
    major, minor = (int(p) for p in scipy.__version__.split(".")[:2])
    doc = getattr(_lbfgsb.setulb, "__doc__", "") or ""
    if (major, minor) < (1, 15) or "ln_task" not in doc:
        return None
    return _lbfgsb.setulb


class DeepRepresentation(Attack):
    """Sabour et al.'s feature attack with the paper's k-NN stop.

    epsilon: L-infinity bound on the [0, 1] scale (the paper's delta).
    steps: L-BFGS-B iterations per sample at most (the paper: 100 and 1000).
    k, metric: the gallery k-NN that decides success ("euclidean" or "cosine").
    max_evaluations: function evaluations per sample at most (None: ``2 * steps + 10``).
    memory: L-BFGS-B's number of correction pairs (scipy's default 10).
    autocast: None (full precision) or "bfloat16"/"float16": the model calls under
        torch.autocast, the attack's own arithmetic in full precision.

    Call as ``attack(model, images, targets, gallery=g)`` (impersonation) or
    ``attack(model, images, labels=identities, gallery=g)`` (dodging). The result's
    ``extra["evaluations"]`` holds each sample's function evaluations.
    """

    reads = "features"
    #: "auto" (reverse communication where scipy offers it, else threads) or "threads"
    _driver: str = "auto"

    def __init__(
        self,
        *,
        epsilon: float,
        steps: int = 100,
        k: int = 1,
        metric: str = "euclidean",
        max_evaluations: int | None = None,
        memory: int = 10,
        autocast: str | None = None,
    ) -> None:
        self.autocast = check_autocast(autocast)
        self.epsilon = float(positive("epsilon", epsilon))
        if int(steps) != steps or steps < 1:
            raise ConfigValueError(f"steps must be an integer >= 1, got {steps!r}")
        if int(k) != k or k < 1:
            raise ConfigValueError(f"k must be an integer >= 1, got {k!r}")
        if metric not in ("euclidean", "cosine"):
            raise ConfigValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        if max_evaluations is not None and (
            int(max_evaluations) != max_evaluations or max_evaluations < 1
        ):
            raise ConfigValueError(
                f"max_evaluations must be an integer >= 1, got {max_evaluations!r}"
            )
        if int(memory) != memory or memory < 1:
            raise ConfigValueError(f"memory must be an integer >= 1, got {memory!r}")
        self.steps = int(steps)
        self.k = int(k)
        self.metric = metric
        self.max_evaluations = int(max_evaluations or 2 * self.steps + 10)
        self.memory = int(memory)

    def __repr__(self) -> str:
        return (
            f"DeepRepresentation(epsilon={self.epsilon}, steps={self.steps}, k={self.k}, "
            f"metric={self.metric!r}, autocast={self.autocast!r})"
        )

    def __call__(  # type: ignore[override]
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        gallery: Any = None,
        k: int | None = None,
    ) -> AttackResult:
        """Positional third argument: target identities (impersonation); ``labels=`` alone:
        the true identities to move away from (dodging)."""
        if targets is not None and labels is not None:
            raise ValueError(
                "DeepRepresentation: pass targets (impersonation) or labels= (dodging), not both"
            )
        if targets is None and labels is None:
            raise ValueError(
                "DeepRepresentation needs targets (impersonation: attack(model, images, "
                "targets, gallery=g)) or labels= (dodging)"
            )
        _STATS.evaluations = None
        result = super().__call__(model, images, labels, targets=targets, gallery=gallery, k=k)
        evaluations = getattr(_STATS, "evaluations", None)
        if evaluations is not None:
            result.extra["evaluations"] = evaluations
        _STATS.evaluations = None
        return result

    def run(
        self, model: nn.Module, images: torch.Tensor, objective
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(objective, "anchor"):
            raise TypeError(
                f"DeepRepresentation pursues a feature objective (Impersonation or Dodging), "
                f"got {type(objective).__name__}"
            )
        n = images.shape[0]
        shape = images.shape[1:]
        device, dtype = images.device, images.dtype
        source = images.detach()
        # bounds computed exactly as the base class projects, so a point inside them is left
        # untouched by that projection (float32 values are exact in float64)
        lower = torch.maximum(source - self.epsilon, torch.zeros_like(source)).clamp(0, 1)
        upper = torch.minimum(source + self.epsilon, torch.ones_like(source)).clamp(0, 1)
        anchor = objective.anchor().detach().clone().to(device)
        sign = -1.0 if isinstance(objective, Dodging) else 1.0

        def evaluate(index: list[int], points: np.ndarray) -> list[tuple[float, np.ndarray, bool]]:
            rows = torch.as_tensor(index, device=device)
            x = torch.from_numpy(points).to(device=device, dtype=dtype).view(-1, *shape)
            x = torch.minimum(torch.maximum(x, lower[rows]), upper[rows]).requires_grad_(True)
            feats = self.output(model, x)
            with torch.no_grad():
                reached = objective.subset(rows).achieved(feats.detach())
                reached = self.confirm(model, x.detach(), reached, objective.subset(rows))
            f, a = feats, anchor[rows].to(feats.dtype)
            if self.metric == "cosine":
                f, a = F.normalize(f, dim=1), F.normalize(a, dim=1)
            loss = sign * (f - a).pow(2).sum(1)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            # one device-to-host copy per round: [loss, reached, gradient...] per sample
            parts = (loss.detach()[:, None], reached[:, None], grad.detach().flatten(1))
            host = torch.cat([t.double() for t in parts], 1).cpu().numpy()
            return [(float(row[0]), row[2:], bool(row[1])) for row in host]

        lo = lower.double().cpu().numpy().reshape(n, -1)
        hi = upper.double().cpu().numpy().reshape(n, -1)
        x0 = source.double().cpu().numpy().reshape(n, -1)
        setulb = _setulb() if self._driver == "auto" else None
        if setulb is not None:
            outcome = self._drive(setulb, evaluate, x0, lo, hi)
        else:
            outcome = self._threads(evaluate, x0, lo, hi)
        adversarial = torch.from_numpy(np.stack([o.x for o in outcome]))
        adversarial = adversarial.to(device=device, dtype=dtype).view_as(source)
        _STATS.evaluations = torch.tensor(
            [o.evaluations for o in outcome], dtype=torch.int64, device=device
        )
        iterations = torch.tensor([o.iterations for o in outcome], dtype=torch.int64, device=device)
        return adversarial, iterations

    # ------------------------------------------------ reverse communication (scipy >= 1.15)
    def _drive(self, setulb, evaluate, x0, lo, hi) -> list[_Outcome]:
        """scipy's ``_minimize_lbfgsb`` loop, for all samples at once: each sample's state
        advances until it asks for f and g at a new point; the asks are answered together."""
        n = x0.shape[0]
        outcome = [_Outcome(x0[i].copy()) for i in range(n)]
        states = [_State(x0[i], self.memory) for i in range(n)]
        # scipy's ScalarFunction evaluates at x0 when it is built
        live = []
        for i, (value, grad, reached) in enumerate(evaluate(list(range(n)), x0)):
            outcome[i].evaluations = 1
            if reached:
                continue
            states[i].remember(x0[i], value, grad)
            live.append(i)
        factr = _FTOL / np.finfo(float).eps
        while live:
            asking = []
            for i in live:
                st, out = states[i], outcome[i]
                while True:
                    st.g = st.g.astype(np.float64)  # a fresh copy, as scipy passes it
                    setulb(self.memory, st.x, lo[i], hi[i], st.nbd, st.f, st.g, factr, _GTOL,
                           st.wa, st.iwa, st.task, st.lsave, st.isave, st.dsave, _MAXLS,
                           st.ln_task)  # fmt: skip
                    if st.task[0] == 3:  # f and g wanted at st.x
                        if np.array_equal(st.x, st.last):  # ScalarFunction's cache
                            st.f, st.g = st.last_f, st.last_g
                            continue
                        asking.append(i)
                        break
                    if st.task[0] == 1:  # an iteration completed
                        st.nit += 1
                        if st.nit >= self.steps:
                            st.task[:] = (5, 504)
                        elif out.evaluations > self.max_evaluations:
                            st.task[:] = (5, 502)
                        continue
                    out.x = np.clip(st.x, lo[i], hi[i])  # converged, stopped or abnormal
                    out.iterations = st.nit
                    break
            live = []
            if not asking:
                break
            answers = evaluate(asking, np.stack([states[i].x for i in asking]))
            for i, (value, grad, reached) in zip(asking, answers, strict=True):
                st, out = states[i], outcome[i]
                out.evaluations += 1
                if reached:  # the iteration in progress found it
                    out.x = st.x.copy()
                    out.iterations = st.nit + 1
                    continue
                st.remember(st.x, value, grad)
                st.f, st.g = value, grad
                live.append(i)
        return outcome

    # -------------------------------------------------------- threads (older scipy)
    def _threads(self, evaluate, x0, lo, hi) -> list[_Outcome]:
        n = x0.shape[0]
        oracle = _BatchedOracle(evaluate, n)
        outcome = [_Outcome(x0[i].copy()) for i in range(n)]
        threads = [
            threading.Thread(
                target=self._optimise,
                args=(i, oracle, outcome[i], x0[i], lo[i], hi[i]),
                name=f"crossres-dr-{i}",
                daemon=True,
            )
            for i in range(n)
        ]
        for t in threads:
            t.start()
        try:
            oracle.serve()
        finally:
            for t in threads:
                t.join()
        for o in outcome:
            if o.error is not None:
                raise o.error
        return outcome

    def _optimise(
        self,
        i: int,
        oracle: _BatchedOracle,
        out: _Outcome,
        x0: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> None:
        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad, reached = oracle.ask(i, x)
            out.evaluations += 1
            if reached:
                # the iteration in progress found it (0: the source itself)
                out.iterations = out.iterations + 1 if out.evaluations > 1 else 0
                raise _Reached(x.copy())
            return value, grad

        def callback(*_: Any) -> None:
            out.iterations += 1

        try:
            res = minimize(
                fun,
                x0,
                jac=True,
                method="L-BFGS-B",
                bounds=Bounds(lo, hi),
                callback=callback,
                options={
                    "maxiter": self.steps,
                    "maxfun": self.max_evaluations,
                    "maxcor": self.memory,
                },
            )
            out.x = np.clip(res.x, lo, hi)
            out.iterations = int(res.nit)
        except _Reached as stop:
            out.x = stop.x
        except _Aborted:
            pass
        except BaseException as error:  # reported by the calling thread
            out.error = error
        finally:
            oracle.leave()


class _Reached(Exception):
    """Raised inside the objective to end a sample's L-BFGS-B at the point the k-NN accepts."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        self.x = x


class _Aborted(Exception):
    """The oracle failed (an error in the model); the worker gives up quietly."""


class _State:
    """One sample's L-BFGS-B work arrays, as ``_minimize_lbfgsb`` allocates them."""

    def __init__(self, x0: np.ndarray, m: int) -> None:
        n = x0.size
        self.x = np.array(x0, dtype=np.float64)
        self.f = np.array(0.0, dtype=np.float64)
        self.g = np.zeros(n, dtype=np.float64)
        self.nbd = np.full(n, 2, dtype=np.int32)  # every variable boxed on both sides
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
        self.iwa = np.zeros(3 * n, dtype=np.int32)
        self.task = np.zeros(2, dtype=np.int32)
        self.ln_task = np.zeros(2, dtype=np.int32)
        self.lsave = np.zeros(4, dtype=np.int32)
        self.isave = np.zeros(44, dtype=np.int32)
        self.dsave = np.zeros(29, dtype=np.float64)
        self.nit = 0
        self.last: np.ndarray | None = None
        self.last_f = 0.0
        self.last_g = self.g

    def remember(self, x: np.ndarray, value: float, grad: np.ndarray) -> None:
        self.last, self.last_f, self.last_g = x.copy(), value, grad


class _Outcome:
    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.iterations = 0
        self.evaluations = 0
        self.error: BaseException | None = None


class _BatchedOracle:
    """Answers the f/grad requests of all live per-sample optimisers in one batch.

    Workers call ``ask`` (blocking) and ``leave`` when done; the calling thread runs
    ``serve``, which waits until every live worker has a request pending, evaluates them
    together, hands the answers back and repeats until nobody is left.
    """

    def __init__(self, evaluate, workers: int) -> None:
        self._evaluate = evaluate
        self._live = workers
        self._cond = threading.Condition()
        self._pending: dict[int, np.ndarray] = {}
        self._answers: dict[int, tuple[float, np.ndarray, bool]] = {}
        self._failed = False

    def ask(self, i: int, x: np.ndarray) -> tuple[float, np.ndarray, bool]:
        with self._cond:
            if self._failed:
                raise _Aborted
            self._pending[i] = x
            self._cond.notify_all()
            while i not in self._answers and not self._failed:
                self._cond.wait()
            if self._failed:
                raise _Aborted
            return self._answers.pop(i)

    def leave(self) -> None:
        with self._cond:
            self._live -= 1
            self._cond.notify_all()

    def serve(self) -> None:
        while True:
            with self._cond:
                while self._live > 0 and len(self._pending) < self._live:
                    self._cond.wait()
                if self._live == 0:
                    return
                batch, self._pending = self._pending, {}
            index = sorted(batch)
            try:
                answers = self._evaluate(index, np.stack([batch[i] for i in index]))
            except BaseException:
                with self._cond:
                    self._failed = True
                    self._cond.notify_all()
                raise
            with self._cond:
                self._answers.update(zip(index, answers, strict=True))
                self._cond.notify_all()
