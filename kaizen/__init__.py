"""Kaizen: a chat service that gets better while people use it.

The `kaizen` command line (kaizen/cli.py) fronts both sides: the online
services/ and the offline trainer/.
"""

__version__ = "0.1.0"
