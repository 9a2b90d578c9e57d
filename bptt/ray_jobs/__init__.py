"""Ray Tune sweeps whose every trial is a Ray Train data-parallel job (``bptt sweep``)."""
