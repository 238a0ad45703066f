"""After an outage the sender uploads each artifact path once, its latest version.

A 73-epoch outage once made the sender upload the same checkpoint 160 times (146 MB for a 330 KB
model): every checkpoint record of the journal uploaded the file as it is now.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from kd.tracking.journal import Journal
from kd.tracking.sender import ship


def test_a_long_outage_uploads_each_artifact_path_once(store: str, tmp_path: Path) -> None:
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("catch-up")).info.run_id
    journal = Journal(tmp_path / "journal" / run_id)
    checkpoint = journal.folder / "checkpoint" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    epochs = 40
    for epoch in range(1, epochs + 1):  # what a run writes per epoch while the store is away
        checkpoint.write_bytes(epoch.to_bytes(2, "big") * 1000)
        journal.append("artifact", path="checkpoint/checkpoint.pth", dir="checkpoint")
        journal.append("log", step=epoch, metrics={"test_acc": float(epoch)})
    journal.append("artifact", path="checkpoint/checkpoint.pth", dir="checkpoint")  # the last one, again
    uploads: list[str] = []
    log_artifact = client.log_artifact

    def counted(run: str, local: str, artifact_path: str | None = None) -> None:
        uploads.append(local)
        log_artifact(run, local, artifact_path)

    client.log_artifact = counted  # the real upload, counted
    shipped = ship(client, journal.folder)
    assert shipped == epochs + 1 and journal.pending() == []  # the repeated uploads count as shipped
    assert uploads == [str(checkpoint)]
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == list(range(1, epochs + 1))
    stored = Path(client.download_artifacts(run_id, "checkpoint/checkpoint.pth", str(tmp_path / "got")))
    assert stored.read_bytes() == checkpoint.read_bytes()
