"""Studies of TinyViT: experiment files, Ray Tune + Optuna, every trial in MLflow."""
