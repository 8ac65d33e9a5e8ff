"""The ClientApp: fedleak's client, unchanged (a client training a fedleak MLP on its partition).

It reads the run's settings from the train message's config, trains through the run's defenses (Flower's
own DP, ``local-dp`` / ``central-dp``, as Flower's mods on this ClientApp) and, for evaluation only, writes its
true batch to the folder the server names (never inside a Flower message; the attack never reads it).
"""

from fedleak.federation.client_app import make_client_app

app = make_client_app()
