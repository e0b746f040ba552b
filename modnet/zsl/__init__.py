"""Generalized zero-shot methods by name (``registry``), one self-registering file each, working on the modular
network trained on the seen classes (``seen_network.SeenNetwork``)."""
