"""Analysis of the tracking store: runs -> pandas -> tables, plots, report.json, feature metrics.

`collect` reads MLflow, `tables` and `plots` turn the frame into thesis material, `report` ties
them together for `kd report`, `features` measures representations, `legacy` imports the beta
tree, `cli` adds the commands to `kd`. See docs/analysis.md.
"""

# Where `kd import-legacy` puts the beta tree by default: not `beta`, the beta grid's experiment,
# whose planner would count the imported runs as its own.
LEGACY_EXPERIMENT = "beta-legacy"
