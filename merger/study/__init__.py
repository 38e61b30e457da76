"""Studies: sweeps of recipe variants stored as optuna studies, and their ranking."""
