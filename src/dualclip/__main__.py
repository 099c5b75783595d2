"""``python -m dualclip``: the same as the ``dualclip`` command."""

from .cli.main import app

app(prog_name="dualclip")
