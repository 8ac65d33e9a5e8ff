"""Split a data set among federated clients: IID, or non-IID label skew (Dirichlet over classes)."""

from __future__ import annotations

import numpy as np
import torch

from fedleak.errors import FedleakError

PARTITIONS = ("iid", "label-skew")


def partition_indices(labels: torch.Tensor, num_clients: int, scheme: str = "iid", *, seed: int = 0,
                      alpha: float = 0.5, min_size: int = 1) -> list[np.ndarray]:
    """Indices of each client's samples (disjoint, together all of ``labels``).

    ``"iid"``: a seeded random split into near-equal parts. ``"label-skew"``: for every class, its samples
    are split among the clients with proportions drawn from ``Dirichlet(alpha)`` (small alpha: each
    client sees few classes); redrawn until every client holds at least ``min_size`` samples.
    """
    n = int(labels.shape[0])
    if num_clients < 1:
        raise FedleakError(f"the number of clients must be positive, got {num_clients}")
    if n < num_clients * min_size:
        raise FedleakError(f"{n} samples cannot give {num_clients} clients {min_size} sample(s) each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "label-skew":
        if alpha <= 0:
            raise FedleakError(f"the Dirichlet alpha must be positive, got {alpha}")
        y = labels.numpy()
        for _ in range(100):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for c in np.unique(y):
                idx = rng.permutation(np.nonzero(y == c)[0])
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
                for k, chunk in enumerate(np.split(idx, cuts)):
                    parts[k].extend(chunk.tolist())
            if min(len(p) for p in parts) >= min_size:
                return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
        raise FedleakError(f"label-skew with alpha={alpha} left a client with fewer than {min_size} samples; "
                           "raise alpha or lower the batch size")
    raise FedleakError(f"unknown partition '{scheme}'; use one of {', '.join(PARTITIONS)}")
