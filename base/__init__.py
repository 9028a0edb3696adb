"""The neutral base below ``methods/``, ``tasks/`` and ``harness/``: user errors, typed options, and the
reading and writing of the files a user hands the tool. It imports nothing of the project above it."""
