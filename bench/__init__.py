"""Benchmarks (not tests): run each as a module from the repository root, ``python -m bench.engine --quick``.

What several benchmarks need (starting a server, reading its memory, building a store of random domains)
is ``bench.harness``; no benchmark imports another one or edits ``sys.path``.
"""
