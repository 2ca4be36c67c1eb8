"""The fact-check desk: a web app and REST API over the findings store
(``deepwatch serve``). See docs/desk.md."""

from streams.desk.app import create_app

__all__ = ["create_app"]
