"""Train and evaluate the MNIST classifier: ``python main.py fit --config config.yaml`` (see README.md)."""

from mnist.cli import run_cli

if __name__ == "__main__":
    run_cli()
