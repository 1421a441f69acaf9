"""The run's records: the tables' one schema and their files (tables), the collector actor that
gathers them (collector), the figures (metrics), the run directory (results), the plots and the
FlagPerf table of several runs (report)."""
