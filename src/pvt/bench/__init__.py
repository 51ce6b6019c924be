"""`pvt bench`: the benchmark harness and its suites (timm, HF transformers and CNNs on the same machine).

``harness`` (settings, rows, alternation, GEMM peaks, the machine record, the suite registry),
``report`` (RESULTS.md and the plots), ``runner`` (``run``: what ``pvt bench`` calls), ``peers``
(the timm / HF twins of our models) and one module per suite, which registers itself on import:
``classify``, ``train``, ``dense``, ``scaling``, ``precision`` (the precision and accuracy suites),
``memory``, ``serve``, ``deploy``. Adding a suite: a module here and its name in
``harness.SUITE_MODULES``.

Nothing in the library imports this package; only the command line does.
"""
