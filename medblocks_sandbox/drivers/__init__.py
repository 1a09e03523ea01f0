"""Drivers: dev tools that play the patient, the clinician and the operator against the product.

The one part of the sandbox allowed to import ``medblocks_pipelines`` (the demo, the scripted
consent browser, the clinician launch): everything else in ``medblocks_sandbox`` imports nothing of
the product. The import-linter contracts in ``.importlinter`` hold both rules.
"""
