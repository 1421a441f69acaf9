"""Tools that measure the product, apart from it: the pipeline against a DataLoader baseline
(benchmark, baseline), the GPU acceptance run (acceptance), and the bookkeeping and the data path
at the real job's size (scale_log, scale_data). Only the command line imports them."""
