"""Lineage into the warehouse: every landing asset is a dep of ``warehouse/base_tables``.

Landing assets are found in the loaded definitions by their tag ``medblocks/layer: landing`` (set on
every asset that writes the landing lake), never from a list kept here: a new pattern's landing
asset shows up upstream of the warehouse by being tagged.

Partition mapping: landing assets are partitioned per (tenant, organization / source / network)
(``acme.mercy``), the warehouse per tenant (``acme``). Dagster has no public mapping from a key
prefix to a partition (a custom ``PartitionMapping`` is not serializable), and
``AllPartitionMapping`` would claim every tenant's warehouse reads every tenant's landings. So the
deps carry no partition mapping: the graph shows lineage between the assets; which tenant a
landing feeds is decided by ``warehouse_on_landing_sensor`` from the partition key's first part.
"""

import warnings

import dagster as dg

from medblocks_pipelines.defs.warehouse.assets import BASE_TABLES_KEY

LANDING_TAG = ("medblocks/layer", "landing")


def _specs(asset: object) -> list[dg.AssetSpec]:
    if isinstance(asset, dg.AssetsDefinition):
        return list(asset.specs)
    if isinstance(asset, dg.AssetSpec):
        return [asset]
    return []


def landing_keys(definitions: dg.Definitions) -> list[dg.AssetKey]:
    """Every asset tagged ``medblocks/layer: landing`` in ``definitions``, sorted."""
    keys = {
        spec.key
        for asset in definitions.assets or []
        for spec in _specs(asset)
        if spec.tags.get(LANDING_TAG[0]) == LANDING_TAG[1]
    }
    return sorted(keys, key=lambda k: k.to_user_string())


def with_landing_lineage(definitions: dg.Definitions) -> dg.Definitions:
    """``definitions`` with every landing asset as a dep of ``warehouse/base_tables``."""
    landing = landing_keys(definitions)

    def add_deps(spec: dg.AssetSpec) -> dg.AssetSpec:
        return spec.merge_attributes(deps=landing) if spec.key == BASE_TABLES_KEY else spec

    # `Definitions.map_asset_specs` is public but marked preview in Dagster 1.13 (pinned in
    # requirements.lock); its warning would repeat on every code-location load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return definitions.map_asset_specs(func=add_deps)
