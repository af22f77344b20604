# Root conftest: makes `import aggc_optax` resolve to this checkout when the
# tests run from a source tree that is not pip-installed (pytest puts the
# directory of a rootdir conftest.py on sys.path).
