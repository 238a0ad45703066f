"""kd: experiment-tracked knowledge distillation on MLflow (docs/architecture.md).

Two MLflow defaults are changed before MLflow is imported (every kd module that uses MLflow does so
after this package's import); a user's own setting of either wins:
- telemetry off: kd's processes make no network call but the tracking store's, and MLflow's
  telemetry thread, failing offline on cluster nodes, removes `_MLFLOW_TELEMETRY_SESSION_ID` from
  os.environ while a request of kd's reads it (one of 32 processes exited 4);
- no "View run ... at" lines when a run ends on a server store: kd prints its own link once, and
  those lines (from the sender's thread, and for kd's claims run) broke the progress bar.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
