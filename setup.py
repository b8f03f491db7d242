"""Builds the optional C++/CUDA extension ``minigpt._C`` (see pyproject.toml for the package itself)."""

from setuptools import setup

setup()
