"""Users' own backprop under test: ``check_backprop`` and ``assert_backprop_matches``."""

from purebp.kit.backprop import BackpropReport, assert_backprop_matches, check_backprop

__all__ = ["BackpropReport", "assert_backprop_matches", "check_backprop"]
