"""``ddim-lab-report`` (top layer): saved result tables → grouped tables, statistics (bootstrap intervals,
paired tests), figures, image grids, the HTML page, and a study preset's declared ``report:`` outputs."""
