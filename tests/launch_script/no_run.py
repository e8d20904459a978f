"""A script that trains nothing through trainkit: the launcher must say so (exit 2).

Both workers print to one pipe; one write per line keeps their lines whole."""
import sys

sys.stdout.write(f"plain work, no trainkit.Run; args: {sys.argv[1:]}\n")
sys.stdout.flush()
