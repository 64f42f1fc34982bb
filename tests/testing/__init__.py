"""Tests of fdp.testing: its strategies, assert_dp_equivalent and its diagnostics."""
