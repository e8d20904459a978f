"""Maps the top-level ``recipes/`` folder into the wheel as ``trainkit.recipes``.

Recipes live at the top of the checkout where users look for them, yet must ship inside
the installed package so that ``python -m trainkit.launch`` finds them outside a checkout.
pyproject.toml cannot combine package discovery with one remapped package, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["trainkit", "trainkit.*"]) + ["trainkit.recipes"],
    package_dir={"trainkit.recipes": "recipes"},
)
