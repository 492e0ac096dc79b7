"""``python -m meunet``: the command line (and ``torchrun -m meunet``)."""

from meunet.cli import main

if __name__ == "__main__":
    main()
