"""fusionkit_peers: fusion methods of the Aff-Wild2 peers of TAGF, for side-by-side ablations."""
