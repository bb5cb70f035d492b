"""The application side of relprop, built on the library and imported by none of it.

cli (the `relprop` command) with explain_cli, evaluate_cli, dataset_cli and demo;
report (self-contained HTML pages); zoo (small models with shipped weights, in data/);
datasets (MNIST, read offline); loading (models and weights by name: torchvision,
timm:, hf:, module:callable, with the preprocessing their weights declare).
"""
