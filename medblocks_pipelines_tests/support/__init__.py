"""Test helpers that used to live in the product (synthetic warehouses, the reference view evaluator)."""
