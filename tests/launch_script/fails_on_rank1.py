"""A script whose rank 1 raises after building its Run: the error must be shown once."""
import trainkit

run = trainkit.Run({"data": {"batch_size": 2}})
if run.dist.rank == 1:
    raise ValueError("bad batch in my_loader (rank 1)")
run.finish()
