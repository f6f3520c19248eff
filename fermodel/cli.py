"""What the command-line tools share: bad flags are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage dump: ``error: <what is wrong>`` and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n")
