"""Build hook placeholder: the native kernel library is added here (see csrc/)."""
from setuptools import setup

setup()
