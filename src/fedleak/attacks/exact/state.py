"""The head attack's state on one update: the dense head's weights (in the model's dtype) and observed gradient (in
the dtype the client sent), both read in float64 a piece at a time (:mod:`~fedleak.nets.float64`), on the network's
device, the update's rounding noise, and the steps that run on it (candidates, walk-down, certificate)."""

from __future__ import annotations

import torch

from fedleak.attacks.exact.candidates import Candidate, top_candidates
from fedleak.attacks.exact.certificate import Certificate, certify
from fedleak.attacks.exact.near_rows import NearRows
from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.walkdown import walk_down
from fedleak.nets import ReluMLP
from fedleak.nets.float64 import back64, product32, row_norms64, times64
from fedleak.precision import FLOAT32, Precision

F64 = torch.float64


class HeadAttack:
    """The exclusivity attack on the dense ReLU head of a network, from the head's gradient.

    ``grads`` is the observed update keyed like ``model.named_parameters()`` (only the head's entries are
    read), ``obs_dtype`` the dtype the client computed it in. ``noise`` (the same keys) is the absolute rounding
    noise of the observed values where the update carries more than the gradient's own float32 noise (a weight
    delta: the client rounded ``before - lr * g``), read from the update's values where it is used
    (:class:`~fedleak.attacks.exact.noise.RoundingNoise`); None otherwise. ``precision``: the format a gradient's
    values carry (a coarser one than float32: sent in float16, computed under autocast; :mod:`fedleak.precision`).
    Every tensor lives on ``net.device``.
    """

    def __init__(self, net: ReluMLP, grads: dict[str, torch.Tensor], opts: ExclusivityOptions, obs_dtype,
                 noise: dict[str, RoundingNoise] | None = None, precision: Precision = FLOAT32):
        self.net, self.opts, self.obs_dtype, self.precision = net, opts, obs_dtype, precision
        self.device = net.device
        dev = self.device
        # the weights stay in the model's dtype (read in float64 a piece at a time); the biases are small
        self.W, self.b = net.weights(net.dense[0].weight.dtype), net.biases(F64)
        # the weight gradients stay in the client's dtype (no float64 copy of a whole layer); the biases are small
        self.G = [grads[d.weight_name].detach().to(device=dev) for d in net.dense]
        self.g = [None if d.bias_name is None else grads[d.bias_name].to(device=dev, dtype=F64) for d in net.dense]
        # the weights' noise is read from the update where it is used (a piece at a time); the biases' is small
        self.noise = None if noise is None else [noise[d.weight_name].on(dev) for d in net.dense]
        self.noise_b = None if noise is None else [
            None if d.bias_name is None else noise[d.bias_name].on(dev).whole() for d in net.dense]
        self.notes: list[str] = []
        self._W_obs: list[torch.Tensor] | None = None
        self._sketches: dict[tuple[int, int, int], torch.Tensor] = {}
        self._row_norms: dict[int, torch.Tensor] = {}
        self._noise_norms: dict[int, torch.Tensor] = {}
        self._floors: dict[int, float] = {}
        self._near_rows: NearRows | None = None
        self.tol_floor = self._noise_floor()
        # the top check's loose screen rises to it for a gradient rounded to a coarser format (float16, autocast)
        # only: a weight delta's own rounding leaves its loss-vector columns as exact as a float32 gradient's
        self.top_tol = self.tol(opts.top_tol) if precision.coarse else opts.top_tol

    def _noise_floor(self) -> float:
        """How far apart the update's own rounding can push two rows of one sample (relative): the grouping
        tolerances are at least this (:meth:`layer_floor` of the top layer)."""
        return self.layer_floor(self.net.depth - 1)

    def layer_floor(self, i: int) -> float:
        """How far the update's own rounding can move the inputs dense layer ``i``'s rows imply (relative): zero for
        a gradient; for a weight delta, 4x the 90th percentile of the layer's rows' relative rounding noise
        (computed once)."""
        if self.noise is None:
            return 0.0
        if i not in self._floors:
            # the norms of the rows [G_i | g_i] and of their noise, from the weight rows' norms (no copy of the layer)
            norm, noise = self.row_norms(i), self.noise_norms(i)
            if self.g[i] is not None:
                norm = torch.hypot(norm, self.g[i])
            live = norm > 0
            self._floors[i] = 4.0 * float(torch.quantile(noise[live] / norm[live], 0.9)) if bool(live.any()) else 0.0
        return self._floors[i]

    def forward_tol(self, i: int) -> float:
        """The relative residual an input to dense layer ``i`` may leave against its known output (the walk-down's
        forward check, the certificate's check of the intermediate activations): ``forward_tol``, raised to the
        rounding floors of the rows the input is read from (layer ``i``'s) and of those the output is (layer
        ``i + 1``'s): a weight delta's rounding at a small learning rate moves both beyond ``forward_tol``."""
        return max(self.opts.forward_tol, self.layer_floor(i) + self.layer_floor(i + 1))

    def activation_tol(self, level: int) -> float:
        """How closely a rebuilt input must reproduce a candidate's known activation at ``level`` (the input of dense
        layer ``level``, relative): :meth:`forward_tol` of the layer below; the input itself, ``forward_tol``."""
        return self.opts.forward_tol if level == 0 else self.forward_tol(level - 1)

    def update_size(self) -> int:
        """The head's observed gradient's size in bytes (its weight and bias gradients as the client sent them)."""
        return sum(G.numel() * G.element_size() for G in self.G) + sum(
            g.numel() * self.obs_dtype.itemsize for g in self.g if g is not None)

    @property
    def rounding_dtype(self) -> torch.dtype:
        """The format the rows are rounded to: a coarser one than float32 that a gradient's values carry
        (:attr:`precision`), else the client's."""
        return self.precision.dtype if self.precision.coarse else self.obs_dtype

    def tol(self, value: float) -> float:
        """A grouping tolerance, raised to the update's rounding-noise floor."""
        return max(value, self.tol_floor)

    @property
    def W_obs(self) -> list[torch.Tensor]:
        """The weights in the observed gradient's dtype (the client's arithmetic): the model's own tensors when
        that is their dtype (the float64 copies are exact, so converting them back gives the same values)."""
        if self._W_obs is None:
            self._W_obs = self.net.weights(self.obs_dtype)
        return self._W_obs

    def row_norms(self, i: int) -> torch.Tensor:
        """The norms of the rows of dense layer ``i``'s weight gradient (float64; computed once)."""
        if i not in self._row_norms:
            self._row_norms[i] = row_norms64(self.G[i])
        return self._row_norms[i]

    def noise_norms(self, i: int) -> torch.Tensor:
        """The norms of the rows of dense layer ``i``'s rounding noise ``[N_i | n_i]`` (float64; computed once;
        only where the update carries a noise, :attr:`noise`)."""
        if i not in self._noise_norms:
            norm = self.noise[i].row_norms()
            self._noise_norms[i] = norm if self.noise_b[i] is None else torch.hypot(norm, self.noise_b[i])
        return self._noise_norms[i]

    def noise_vectors(self, i: int, rows: list[int]) -> torch.Tensor:
        """The rounding noise of the observed entries of rows ``rows`` of dense layer ``i`` (float64; only where
        the update carries a noise): the weight row, the bias entry and, for the top layer, the output layer's
        column, as the witness fit reads the observed entries."""
        parts = [self.noise[i].rows(rows)]
        if self.noise_b[i] is not None:
            parts.append(self.noise_b[i][rows, None])
        if i == self.net.depth - 1:
            parts.append(self.noise[-1].columns(rows).T)
        return torch.cat(parts, dim=1)

    def near_rows(self) -> NearRows | None:
        """The first dense layer as the certificate's test of rival rows reads it (computed once; None for a
        gradient, :class:`~fedleak.attacks.exact.near_rows.NearRows`)."""
        if self._near_rows is None:
            self._near_rows = NearRows.of(self)
        return self._near_rows

    def layer_norm(self, i: int) -> float:
        """The norm of dense layer ``i``'s whole gradient ``[G_i | g_i]`` (float64)."""
        sq = self.row_norms(i).square().sum()
        if self.g[i] is not None:
            sq = sq + self.g[i].to(F64).square().sum()
        return float(sq.sqrt())

    def sketch(self, i: int, omega: torch.Tensor, seed: int, left: bool = False) -> torch.Tensor:
        """``[G_i | g_i] @ omega``, or ``omega^T @ [G_i | g_i]`` (``left``), returned in float64 (``omega``: the
        Gaussian sketch drawn from ``seed`` for dense layer ``i``; float32 for a float32 gradient on the CPU, and
        the product is then taken in float32, :func:`~fedleak.nets.float64.product32`), kept for the next
        certificate of this update: a CNN's head is certified twice."""
        key = (i, omega.shape[1], seed, left, omega.dtype)
        if key not in self._sketches:
            G, g = self.G[i], self.g[i]
            f32 = omega.dtype == torch.float32
            if left:
                sketch = product32(omega.T, G) if f32 else back64(omega.T, G)
                if g is not None:
                    gs = product32(omega.T, g[:, None].to(omega.dtype)) if f32 else (omega.T @ g)[:, None]
                    sketch = torch.cat([sketch, gs], 1)
            else:
                sketch = product32(G, omega[: G.shape[1]]) if f32 else times64(G, omega[: G.shape[1]])
                if g is not None:
                    sketch.addr_(g, omega[-1].to(F64))
            self._sketches[key] = sketch
        return self._sketches[key]

    def top_candidates(self) -> list[Candidate]:
        """Step 1: candidates from the last ReLU layer (:mod:`fedleak.attacks.exact.candidates`)."""
        return top_candidates(self)

    def walk_down(self, cands: list[Candidate], reported: int | None = None) -> None:
        """Step 2: trace candidates down to the head's input (:mod:`fedleak.attacks.exact.walkdown`; ``reported``:
        the update's number of examples)."""
        walk_down(self, cands, reported)

    def certify(self, cands: list[Candidate], reported: int | None) -> Certificate:
        """Step 3: the certificate of the complete candidates (:mod:`fedleak.attacks.exact.certificate`)."""
        return certify(self, cands, reported)
