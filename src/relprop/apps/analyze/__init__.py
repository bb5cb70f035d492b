"""The application side of the dataset analysis (relprop.analysis): `relprop analyze`
(cli.py), relprop's static HTML page of the findings (page.py), and the demo's planted
Clever Hans on the shipped MNIST digits (planted.py, cheat_demo.py, data/)."""
