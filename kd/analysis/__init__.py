"""Analysis of the tracking store: runs -> pandas -> tables, plots, report.json, feature metrics.

`collect` reads MLflow, `tables` and `plots` turn the frame into thesis material, `report` ties
them together for `kd report`, `features` measures representations, `legacy` imports the beta
tree, `cli` adds the commands to `kd`. See docs/analysis.md.
"""
