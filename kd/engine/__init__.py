"""Training: the epoch loop over 1..N students, checkpoints, and the job that runs specs."""
