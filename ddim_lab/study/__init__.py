"""A run as stages (plan the grid → artifacts from the cache or the inverter → sample → decode and score →
record), the tasks besides reconstruct/edit, sweeps, the result records, the inversion cache, protocol ids,
provenance, distributed launch helpers and loggers. Imports config, methods, models, metrics, engine, data."""
