"""The synthetic arithmetic world of the embedded demo: seeded multi-step problems, one operation per step."""
from __future__ import annotations

# The arithmetic world's knobs (config `data.world`, also the bootstrap's `world`).
WORLD_DEFAULTS: dict = {
    "min_ops": 2,  # fewest operations per problem (= arithmetic steps in the solution)
    "max_ops": 3,  # most operations per problem
    "min_operand": 1,  # smallest operand drawn
    "max_operand": 9,  # largest operand drawn
    "ops": "+-*",  # allowed operators, a subset of "+-*/" ("/" only where it divides exactly)
    "max_value": 99,  # every intermediate result stays in [0, max_value]
    "num_test": 200,  # size of the held-out test split (never drawn for training)
}
