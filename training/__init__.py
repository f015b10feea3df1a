"""The machinery behind train.py."""
