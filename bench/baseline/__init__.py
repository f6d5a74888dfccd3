"""The classic design the engine replaces: one PostgreSQL transaction per order."""
