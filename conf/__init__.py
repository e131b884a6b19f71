"""Makes conf/ importable as the package lit_prune.conf (pkg://lit_prune.conf for Hydra)."""
