"""Models: where one lives (sources), its family and pipeline (families), loading it into the lab's interface
(loading, latent), ControlNets (controlnet), configs read without weights (configs), weight fingerprints
(identity), dtype/device/GPU knobs (runtime), random-weight builds (build) and the offline tokenizer."""
