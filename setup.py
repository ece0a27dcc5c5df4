"""Packaging lives in pyproject.toml; this file only lists the packages, which pyproject cannot:
every package under ddpo_lite/ found automatically, plus the top-level presets/ folder, which
ships as `ddpo_lite.presets` (its package-dir mapping and package data are in pyproject.toml)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ddpo_lite", "ddpo_lite.*"]), "ddpo_lite.presets"])
