"""Architecture and hyperparameter search on Optuna: `scaleforge search` and `scaleforge search show`."""
