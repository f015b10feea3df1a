"""The Frozen Lake experiment: build map data, train every method, play the held-out maps in
gymnasium's FrozenLake-v1. The core files (train.py, losses.py, ...) never import this package."""
