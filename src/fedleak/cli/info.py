"""``fedleak info``: versions, built-in data sets and models, registered attacks and defenses.

It lists the registries' catalogs, so it imports neither torch nor any attack, data set or defense module (the
defenses from :mod:`fedleak.defenses.catalog`).
"""

from __future__ import annotations

import typer

from fedleak.cli.app import app


def _table(rows: dict[str, str]) -> None:
    width = max((len(name) for name in rows), default=0)
    for name, text in rows.items():
        typer.echo(f"  {name:<{width}}  {text}")


@app.command()
def info() -> None:
    """Show fedleak's version, built-in data sets, models, attacks and defenses."""
    import fedleak
    from fedleak.attacks import AttackSpec, attack_specs
    from fedleak.defenses import available_defenses

    typer.echo(f"fedleak {fedleak.__version__}")
    typer.echo("data sets:")
    _table(fedleak.available_datasets())
    typer.echo("built-in models (--model):")
    _table(fedleak.available_models())
    typer.echo("attacks (update kinds they run on; which take the client's defenses, --defense, the data's "
               "range, --data-range, and the client's loss, --label-smoothing / --class-weights / --focal-gamma):")
    def takes(spec: AttackSpec) -> str:
        flags = [flag for field, flag in (("takes_defense", "--defense"), ("reads_range", "--data-range"),
                                          ("takes_loss", "the client's loss")) if getattr(spec, field)]
        return f" (takes {', '.join(flags)})" if flags else ""

    _table({name: f"{spec.description} [{', '.join(spec.update_kinds)}]{takes(spec)}"
            for name, spec in attack_specs().items()})
    typer.echo("defenses (--defense NAME[:key=value,...]; stage: what it does (source)):")
    _table(available_defenses())
    from fedleak.membership import available_membership_attacks

    typer.echo("membership attacks (fedleak audit --membership --membership-attacks NAME,...):")
    _table(available_membership_attacks())
