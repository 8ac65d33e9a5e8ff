"""Simulated federated clients: local training that produces the updates a server receives."""

from fedleak.clients.fedavg import LOCAL_OPTIMIZERS, fedavg_update, local_training

__all__ = ["LOCAL_OPTIMIZERS", "fedavg_update", "local_training"]
