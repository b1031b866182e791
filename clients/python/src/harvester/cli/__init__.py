"""The `harvester` command (console script `harvester = harvester.cli:main`)."""

from harvester.cli.app import main, root

__all__ = ["main", "root"]
