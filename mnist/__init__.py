"""MNIST classification with PyTorch Lightning, configured through LightningCLI."""
