"""alexnet-dist: AlexNet (Krizhevsky, Sutskever and Hinton, 2012) on CIFAR-10, distributed with Accelerate."""

__version__ = "0.1.0"
