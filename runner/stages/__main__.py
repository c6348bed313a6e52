"""`python -m runner.stages`: the key table of docs/ARCHITECTURE.md, from the stages' declarations."""
from runner.stages import key_table

print(key_table())
