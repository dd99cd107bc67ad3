"""``python -m minipeft <command>`` (and ``torchrun -m minipeft``): the command line lives in ``minipeft.lab.cli``."""
if __name__ == "__main__":
    from minipeft.lab.cli import main

    main()
