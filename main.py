"""Train and evaluate the MNIST classifier: ``python main.py fit --config config.yaml`` (see README.md)."""

from mnist.cli import run_cli
from mnist.shutdown import run_then_exit


def cli_main(args=None) -> None:
    run_cli(args)


if __name__ == "__main__":
    run_then_exit(cli_main)
