"""A chaos harness: the same run, once undisturbed and once under kills, must agree bit for bit."""
