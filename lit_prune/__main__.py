"""``python -m lit_prune``: the same as the ``lit-prune`` command."""

from lit_prune.cli.app import main

if __name__ == "__main__":
    main()
