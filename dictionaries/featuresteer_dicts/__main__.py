"""``python -m featuresteer_dicts``: the one command."""

from featuresteer_dicts.cli import app

app()
