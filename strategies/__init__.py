"""Strategies by name (``strategies.registry``), one file each, and their plugins (``strategies.plugins``)."""
