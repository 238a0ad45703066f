"""Names of the tags kd writes that more than one module reads (the lease, the run's progress)."""

EPOCH = "kd.epoch"  # epochs done
ERROR = "kd.error"  # why a run stopped (KILLED or FAILED); removed when it finishes
OWNER = "kd.owner"  # host:pid:nonce of the process training the run
HEARTBEAT = "kd.heartbeat"  # unix seconds of the owner's last sign of life
HOST = "kd.host"
TRACKING = "kd.tracking"  # direct (the job ships its journal) or journal (the submitter ingests it)
