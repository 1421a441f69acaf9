"""FlagPerf's faster_rcnn case as a Ray pipeline. Here, the driver: the command line (cli), the
config and its presets, the run (run), the checks before it (preflight, versions) and the live
display (progress). Below the run: data/ (the data path), worker/ (each training worker) and
records/ (the run's records). Between the command line and the run: bench/, the tools that
measure the product (README, Layout)."""
