"""Data sets: image folders with captions (``folders``), PIE-Bench (``pie``), the digits data and mini-benchmark
(``digits``, ``digits_pie``, the ``judge``), and the scorer contract a data set brings its measures through
(``scoring``)."""
