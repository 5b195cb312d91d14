"""``python -m alignkit ...``: the ``alignkit`` command."""

from alignkit.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
