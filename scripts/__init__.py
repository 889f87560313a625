"""Command-line scripts (run as `python scripts/NAME.py` or `python -m scripts.NAME`); a
package so that the tests import them by name, never by file path."""
