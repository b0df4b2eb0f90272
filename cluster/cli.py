"""The `quorumbook` command line. Later issues attach more groups here."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """quorumbook: a Raft-replicated, deterministic order-matching cluster."""


@main.command()
@click.option("--seed", default=7, show_default=True, help="Seed of the trading session.")
@click.option("--orders", default=5000, show_default=True, help="Number of order commands.")
def demo(seed: int, orders: int) -> None:
    """Run a finite, seeded trading session and print what happened.

    Example: quorumbook demo --seed 42 --orders 20000
    """
    from .demo import run

    run(seed, orders)
