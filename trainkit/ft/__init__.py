"""``ft.mode=replicas``: per-step fault tolerance over replica groups, on torchft.

Each replica group holds the whole model. A torchft lighthouse forms a quorum every step; a
lost group is left out of the next step while the others go on, and its replacement heals
from a live peer (weights, optimizer, schedule, step, data position). Each step's global batch
(positions ``[step * B, (step + 1) * B)`` of trainkit's data order) is cut into fixed chunks
dealt over the groups taking part, so data is trained exactly once whoever joins or leaves.
See docs/fault-tolerance.md.

- :mod:`trainkit.ft.loop`: one replica group's training loop;
- :mod:`trainkit.ft.supervisor`: the lighthouse and the groups' processes on this machine
  (``launcher=local``), a lost group restarted in place;
- :mod:`trainkit.ft.transport`: the peer-to-peer state transfer, on loopback by default;
- :mod:`trainkit.ft.ledger`: what each group committed, and the exactly-once check over it;
- :mod:`trainkit.ft.records`: the run's metrics.jsonl and events.jsonl, written from the ledgers;
- :mod:`trainkit.ft.ray`: the same groups as Ray Train workers (Ray's ``TorchftConfig``).

A preemption notice makes a group leave the quorum without costing its peers a step
(:class:`trainkit.ft.loop._Leave`); with no group left to go on, the usual checkpoint and exit 75.
"""
