"""Layer 7, the surfaces a person types: the `act` command line (`main`), `act export` (`export_command`). A thin
layer over the API below it."""

from act.cli.main import main  # noqa: F401 (the `act` console script: act.cli:main)
