"""Optuna studies: study files (``spec``), workers and trials (``runner``), plots (``plots``)."""
