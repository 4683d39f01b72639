"""The methods a study compares, each one module behind one contract: ``inversion`` (inverters),
``editing`` (editors), ``control`` (ControlNet conditioning signals). They build on the engine only."""
