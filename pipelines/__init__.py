"""Thin stage commands: parse paths and one params section, call the library, log to MLflow."""
