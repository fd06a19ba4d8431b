"""prunekit's command line (installed as ``prunekit.cli``): argument parsing only, no logic."""
