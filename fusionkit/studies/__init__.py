"""What compares models: grids of runs, robustness sweeps, statistics, reports and plots."""
