"""Running jobs: ``python -m trainkit.launch`` and the launchers behind one interface.

``launcher.name`` picks a launcher class from ``trainkit.components.LAUNCHERS`` (``local``,
``ray``, or a ``pkg.module:Class`` of one's own); every caller, the CLI and the sweep,
talks to it only through :class:`~trainkit.launch.base.Launcher`.
"""

from trainkit.launch.base import JobResult, Launcher

__all__ = ["JobResult", "Launcher"]
