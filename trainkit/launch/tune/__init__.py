"""``-m`` sweeps with ``launcher=ray``: a Ray Tune experiment whose trials are trainkit runs.

* :mod:`.options` — ``sweep.*`` (a sweep file ``sweep=<name>`` plus ``sweep.key=value``);
* :mod:`.space` — search spaces from a sweep file or Hydra's sweep grammar;
* :mod:`.search` — the search algorithms (random, grid, Optuna) and schedulers (none, ASHA);
* :mod:`.driver` — validation, ``Tuner``/``Tuner.restore``, the results table;
* :mod:`.trainable` — the Tune trainable that runs, follows and stops one trial's run;
* :mod:`.trial` — the trial's process on its node (the local launcher on the trial's run_dir).

Only :mod:`.driver` and :mod:`.trainable` import Ray; the rest validates without it.
"""
