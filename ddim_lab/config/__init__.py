"""The typed config schema (Hydra's ConfigStore), composition and the checks that run before any model loads:
budgets, ControlNet settings, Optuna objectives and a study's ``report:`` section."""
