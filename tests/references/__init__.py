"""Compact transcriptions of the reference code of the lab's methods (inverters, editors), one module per
reference.

Each is written from the repository a method's docstring names, in torch, with the reference's own loop and
scheduler arithmetic — never through ``ddim_lab``'s step functions, so that a parity test against the lab's
implementation can fail. Every function names the file and function it transcribes.
"""
