"""A script that trains nothing through trainkit: the launcher must say so (exit 2)."""
import sys

print("plain work, no trainkit.Run; args:", sys.argv[1:])
