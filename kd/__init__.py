"""kd: experiment-tracked knowledge distillation on MLflow (docs/architecture.md).

kd's processes make no network call but the tracking store's. MLflow's telemetry thread fails
offline on cluster nodes and, in failing, removes `_MLFLOW_TELEMETRY_SESSION_ID` from os.environ
while a request of kd's reads it (one of 32 processes exited 4): it is off before MLflow is imported,
which every kd module that uses MLflow does after this package's import. A user may still turn it on.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
