"""The former name of tests/oracle.py, kept so that `import reference` still works; new code imports oracle."""
from oracle import *  # noqa: F401,F403
