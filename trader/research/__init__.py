"""Research tools: parameter sweeps, walk-forward and run comparison."""
