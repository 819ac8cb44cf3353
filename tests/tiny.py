"""Shared settings of the tests' tiny fleets (imported by conftest and by tests that
build their own config; a conftest is not a module to import)."""

# Both training phases, sized so that a participation at 10-12 photos and batch 4 (3
# batches) takes 1 + 2 = 3 steps, as the one-epoch joint phase the end-to-end tests
# were measured with did: their budgets bind and their rounds last as before.
TINY_PHASES = ("local.personal_epochs=0.34", "local.epochs=0.67")
